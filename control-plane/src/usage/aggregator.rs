use crate::engine::Engine;
use crate::error::Error;
use aigw_shared::domain::{BudgetPeriod, ResourceKind};
use aigw_shared::proto::usage::v1::{CacheStatus, UsageEvent};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::instrument;

const SEEN: &[u8] = b"s/";
/// How long event ids are remembered for deduplication: longer than the
/// usage stream keeps events (7 days), so JetStream cannot redeliver one the
/// aggregator has forgotten. Older events are refused, never counted twice.
pub const DEDUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(8 * 24 * 3600);
const ROW: &[u8] = b"r/";
const NANOS_PER_USD: f64 = 1e9;

/// One aggregate row's counters. Cost is kept in nano-USD so sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: u64,
    pub cache_hits: u64,
}

impl Counters {
    /// Saturating: an upstream reporting absurd token counts pins a row at
    /// `u64::MAX` rather than wrapping it to a small number.
    fn add(&mut self, o: &Counters) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(o.cost_nanos);
        self.cache_hits = self.cache_hits.saturating_add(o.cache_hits);
    }
}

/// Adds `cost` to a day's spend, saturating.
fn add_spend(spend: &mut HashMap<String, BTreeMap<String, u64>>, key: &RowKey, cost: u64) {
    let day = spend
        .entry(key.api_key.clone())
        .or_default()
        .entry(key.day.clone())
        .or_default();
    *day = day.saturating_add(cost);
}

/// Aggregation key: UTC day, api key, model alias, deployment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RowKey {
    day: String,
    api_key: String,
    model: String,
    deployment: String,
}

impl RowKey {
    fn encode(&self) -> Vec<u8> {
        let mut k = ROW.to_vec();
        for (i, part) in [&self.day, &self.api_key, &self.model, &self.deployment]
            .iter()
            .enumerate()
        {
            if i > 0 {
                k.push(0);
            }
            k.extend_from_slice(part.as_bytes());
        }
        k
    }

    fn decode(k: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(k.strip_prefix(ROW)?).ok()?;
        let mut parts = text.split('\0').map(str::to_string);
        Some(Self {
            day: parts.next()?,
            api_key: parts.next()?,
            model: parts.next()?,
            deployment: parts.next()?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dimension {
    ApiKey,
    Model,
    Deployment,
    Day,
}

impl Dimension {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "api_key" => Some(Self::ApiKey),
            "model" => Some(Self::Model),
            "deployment" => Some(Self::Deployment),
            "day" => Some(Self::Day),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Model => "model",
            Self::Deployment => "deployment",
            Self::Day => "day",
        }
    }
}

/// A usage query: dimensions to group by and an inclusive UTC day range.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub group_by: Vec<Dimension>,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UsageRow {
    pub group: BTreeMap<&'static str, String>,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
    pub cache_hits: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    pub counted: usize,
    pub duplicates: usize,
    /// Older than the dedup window: refused (and logged), never counted.
    pub too_old: usize,
}

#[derive(Default)]
struct Mem {
    rows: BTreeMap<RowKey, Counters>,
    /// Spend per api key per day, for budgets.
    spend: HashMap<String, BTreeMap<String, u64>>,
}

pub struct Aggregator {
    db: sled::Db,
    tree: sled::Tree,
    engine: Arc<Engine>,
    mem: Mutex<Mem>,
    exceeded: watch::Sender<Arc<BTreeSet<String>>>,
}

impl Aggregator {
    /// Opens `usage.sled` in `data_dir` and loads the aggregates.
    pub fn open(data_dir: &Path, engine: Arc<Engine>) -> Result<Arc<Self>, Error> {
        let path = data_dir.join("usage.sled");
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(crate::store::SLED_CACHE_BYTES);
        let db = crate::store::open_sled(config, &path)?;
        let tree = db.open_tree("usage")?;
        let mut mem = Mem::default();
        for item in tree.scan_prefix(ROW) {
            let (k, v) = item?;
            let key = RowKey::decode(&k)
                .ok_or_else(|| Error::Storage("malformed usage row key".into()))?;
            let c: Counters =
                serde_json::from_slice(&v).map_err(|e| Error::Storage(e.to_string()))?;
            add_spend(&mut mem.spend, &key, c.cost_nanos);
            mem.rows.insert(key, c);
        }
        let agg = Arc::new(Self {
            db,
            tree,
            engine,
            mem: Mutex::new(mem),
            exceeded: watch::channel(Arc::new(BTreeSet::new())).0,
        });
        agg.refresh_budgets();
        Ok(agg)
    }

    /// Forgets the ids of events older than the dedup window. Ids are UUID
    /// v7, which sort by time, so the forgotten ones are one key range.
    #[instrument(skip_all, fields(removed))]
    pub fn prune_seen(&self, now_unix_ms: i64) -> Result<usize, Error> {
        let cutoff = now_unix_ms - DEDUP_WINDOW.as_millis() as i64;
        let first_kept = uuid_v7_floor(cutoff);
        let end = [SEEN, first_kept.as_bytes()].concat();
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for item in self.tree.range(SEEN.to_vec()..end) {
            let (k, _) = item?;
            batch.remove(k);
            removed += 1;
        }
        if removed > 0 {
            self.tree.apply_batch(batch)?;
            self.db.flush()?;
        }
        tracing::Span::current().record("removed", removed);
        Ok(removed)
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts each event once: events whose id was seen before are skipped.
    /// Returns only once the new aggregates are durable, so the caller may ack.
    ///
    /// A debug span: at info it would be exported as a one-span trace of its
    /// own for every usage batch (one per call on a lightly loaded
    /// standalone node), noise beside the calls' traces; the usage metrics
    /// count ingests.
    #[instrument(level = "debug", skip_all, fields(events = events.len(), counted, duplicates))]
    pub fn ingest(&self, events: &[UsageEvent]) -> Result<IngestStats, Error> {
        let mut stats = IngestStats::default();
        let mut mem = self.mem();
        let mut batch = sled::Batch::default();
        let mut in_batch = HashSet::new();
        let mut touched: BTreeMap<RowKey, Counters> = BTreeMap::new();
        {
            let state = self.engine.read();
            let oldest_ms = unix_ms_now() - DEDUP_WINDOW.as_millis() as i64;
            for e in events {
                if e.time_unix_ms < oldest_ms {
                    tracing::error!(event_id = %e.id, api_key_id = %e.api_key_id, time_unix_ms = e.time_unix_ms,
                        "usage event older than the dedup window refused: it could be a forgotten duplicate");
                    stats.too_old += 1;
                    continue;
                }
                let seen_key = [SEEN, e.id.as_bytes()].concat();
                if e.id.is_empty()
                    || !in_batch.insert(e.id.as_str())
                    || self.tree.contains_key(&seen_key)?
                {
                    stats.duplicates += 1;
                    continue;
                }
                let day = day_of(e.time_unix_ms);
                batch.insert(seen_key, day.as_bytes());
                let hit = e.cache_status == CacheStatus::Hit as i32;
                let cost_nanos = if hit {
                    0
                } else {
                    let cost = state
                        .id_by_name(ResourceKind::Model, &e.model)
                        .and_then(|id| state.models.get(id))
                        .and_then(|m| m.value.cost);
                    cost.map_or(0, |c| {
                        nanos(e.prompt_tokens, c.input_per_1k)
                            .saturating_add(nanos(e.completion_tokens, c.output_per_1k))
                    })
                };
                let add = Counters {
                    requests: 1,
                    errors: u64::from(e.status >= 400),
                    prompt_tokens: e.prompt_tokens,
                    completion_tokens: e.completion_tokens,
                    cost_nanos,
                    cache_hits: u64::from(hit),
                };
                let key = RowKey {
                    day,
                    api_key: e.api_key_id.clone(),
                    model: e.model.clone(),
                    deployment: e.deployment.clone(),
                };
                touched.entry(key).or_default().add(&add);
                stats.counted += 1;
            }
        }
        let mut updated = Vec::with_capacity(touched.len());
        for (key, add) in touched {
            let mut c = mem.rows.get(&key).copied().unwrap_or_default();
            c.add(&add);
            batch.insert(
                key.encode(),
                serde_json::to_vec(&c).map_err(|e| Error::Storage(e.to_string()))?,
            );
            updated.push((key, c, add.cost_nanos));
        }
        // Seen ids and aggregates land in one atomic batch, so a redelivered
        // event is either fully counted or not at all.
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        for (key, c, cost) in updated {
            crate::metrics::METRICS.cost(&key.model, cost);
            add_spend(&mut mem.spend, &key, cost);
            mem.rows.insert(key, c);
        }
        drop(mem);
        if stats.counted > 0 {
            self.refresh_budgets();
        }
        let span = tracing::Span::current();
        span.record("counted", stats.counted);
        span.record("duplicates", stats.duplicates);
        crate::metrics::METRICS.usage_ingested(
            stats.counted as u64,
            stats.duplicates as u64,
            stats.too_old as u64,
        );
        Ok(stats)
    }

    /// Recomputes which api keys are over budget in their current period and
    /// publishes the set if it changed.
    pub fn refresh_budgets(&self) {
        let today = day_of(OffsetDateTime::now_utc().unix_timestamp() * 1000);
        let month = &today[..7];
        let mut over = BTreeSet::new();
        {
            // Never both locks at once here: `ingest` holds `mem` while it
            // reads the state, and a writer waiting for the state lock would
            // otherwise close a cycle (a deadlock under writes and usage).
            let budgets: Vec<(String, aigw_shared::domain::Budget)> = {
                let state = self.engine.read();
                state
                    .api_keys
                    .iter()
                    .filter_map(|(id, rec)| rec.value.budget.map(|b| (id.clone(), b)))
                    .collect()
            };
            let mem = self.mem();
            for (id, budget) in &budgets {
                let days = mem.spend.get(id);
                let spent: u64 = match budget.period {
                    BudgetPeriod::Day => days.and_then(|d| d.get(&today)).copied().unwrap_or(0),
                    BudgetPeriod::Month => days.map_or(0, |d| {
                        d.range(format!("{month}-00")..=format!("{month}-99"))
                            .fold(0u64, |a, (_, v)| a.saturating_add(*v))
                    }),
                    BudgetPeriod::Total => {
                        days.map_or(0, |d| d.values().fold(0u64, |a, v| a.saturating_add(*v)))
                    }
                };
                if spent as f64 >= budget.max_usd * NANOS_PER_USD {
                    over.insert(id.clone());
                }
            }
        }
        self.exceeded.send_if_modified(|cur| {
            if **cur != over {
                tracing::info!(keys = ?over, "api keys over budget changed");
                *cur = Arc::new(over);
                true
            } else {
                false
            }
        });
    }

    /// Api keys over budget now; changes wake the snapshot cache.
    pub fn exceeded(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.exceeded.subscribe()
    }

    /// Sums the aggregates over `[from, to]` (inclusive days), grouped by `group_by`.
    pub fn query(&self, q: &UsageQuery) -> Vec<UsageRow> {
        let (group_by, from, to) = (&q.group_by, q.from.as_deref(), q.to.as_deref());
        let mem = self.mem();
        let mut groups: BTreeMap<Vec<String>, Counters> = BTreeMap::new();
        for (k, c) in &mem.rows {
            if from.is_some_and(|f| k.day.as_str() < f) || to.is_some_and(|t| k.day.as_str() > t) {
                continue;
            }
            let g = group_by
                .iter()
                .map(|d| match d {
                    Dimension::ApiKey => k.api_key.clone(),
                    Dimension::Model => k.model.clone(),
                    Dimension::Deployment => k.deployment.clone(),
                    Dimension::Day => k.day.clone(),
                })
                .collect();
            groups.entry(g).or_default().add(c);
        }
        groups
            .into_iter()
            .map(|(g, c)| UsageRow {
                group: group_by.iter().map(|d| d.name()).zip(g).collect(),
                requests: c.requests,
                errors: c.errors,
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                total_tokens: c.prompt_tokens.saturating_add(c.completion_tokens),
                cost_usd: c.cost_nanos as f64 / NANOS_PER_USD,
                cache_hits: c.cache_hits,
            })
            .collect()
    }
}

/// Cost of `tokens` at `per_1k` USD per 1,000 tokens, in nano-USD. The
/// float-to-int cast saturates (and maps NaN to 0), so no input wraps.
fn nanos(tokens: u64, per_1k: f64) -> u64 {
    (tokens as f64 * per_1k * 1e6).round() as u64
}

/// UTC day (`YYYY-MM-DD`) of a unix time in milliseconds.
pub fn unix_ms_now() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The smallest UUID v7 (hyphenated, lower case) of millisecond `unix_ms`.
fn uuid_v7_floor(unix_ms: i64) -> String {
    let ms = unix_ms.max(0) as u64 & 0xFFFF_FFFF_FFFF;
    uuid::Uuid::from_u128(u128::from(ms) << 80 | 0x7 << 76 | 0x2 << 62).to_string()
}

pub fn day_of(unix_ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Cipher;
    use crate::store::SledStore;

    const HOUR_MS: i64 = 3_600_000;

    fn event(id: String, time_unix_ms: i64) -> UsageEvent {
        UsageEvent {
            id,
            time_unix_ms,
            api_key_id: "k1".into(),
            model: "m".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
            status: 200,
            ..Default::default()
        }
    }

    async fn aggregator(dir: &Path) -> Arc<Aggregator> {
        let store = Arc::new(SledStore::open(dir).unwrap());
        let engine = Engine::open(store, Cipher::new(&[9; 32]), 1_000)
            .await
            .unwrap();
        Aggregator::open(dir, engine).unwrap()
    }

    /// An aggregator whose engine holds model `m` priced at `cost`.
    async fn priced(dir: &Path, cost: aigw_shared::domain::Cost) -> Arc<Aggregator> {
        use crate::events::{Command, ResourceValue, StoredProviderKey};
        use aigw_shared::domain::{Model, ProviderKey};
        let store = Arc::new(SledStore::open(dir).unwrap());
        let engine = Engine::open(store, Cipher::new(&[9; 32]), 1_000)
            .await
            .unwrap();
        let pk = ProviderKey {
            display_name: "pk".into(),
            provider: String::new(),
            adapter: "azure-openai".into(),
            secret: "k".into(),
            api_base: "https://acme.openai.azure.com".into(),
            api_version: "2024-10-21".into(),
            ca_pem: None,
            allow_insecure_upstream: false,
        };
        let sealed = engine.cipher().seal("pk", "k").unwrap();
        let model = Model {
            display_name: "m".into(),
            provider: String::new(),
            model_name: Some("d".into()),
            provider_key_id: Some("pk".into()),
            targets: vec![],
            routing: None,
            rate_limit: None,
            cost: Some(cost),
            cache: None,
            log_payloads: false,
            context_window: None,
            fallbacks: Default::default(),
        };
        for (id, value) in [
            (
                "pk",
                ResourceValue::ProviderKey(StoredProviderKey::new(pk, sealed)),
            ),
            ("m", ResourceValue::Model(model)),
        ] {
            let id = id.to_string();
            engine
                .execute(Command::Create { id, value }, "test")
                .await
                .unwrap();
        }
        Aggregator::open(dir, engine).unwrap()
    }

    #[tokio::test]
    async fn absurd_token_counts_saturate_instead_of_wrapping() {
        // Given a priced model,
        let dir = tempfile::tempdir().unwrap();
        let agg = priced(
            dir.path(),
            aigw_shared::domain::Cost {
                input_per_1k: 0.01,
                output_per_1k: 0.03,
            },
        )
        .await;
        // when the upstream reports u64::MAX tokens on two calls,
        let now = unix_ms_now();
        let huge = |id: String| UsageEvent {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            total_tokens: u64::MAX,
            ..event(id, now)
        };
        let s = agg
            .ingest(&[huge(uuid_v7_floor(now)), huge(uuid_v7_floor(now + 1))])
            .unwrap();
        assert_eq!(s.counted, 2);

        // then the aggregates and the cost stay pinned at the top, not wrapped
        // to a small number (which would also reopen a spent budget).
        let rows = agg.query(&UsageQuery::default());
        let row = &rows[0];
        assert_eq!(row.requests, 2);
        assert_eq!(row.prompt_tokens, u64::MAX);
        assert_eq!(row.completion_tokens, u64::MAX);
        assert_eq!(row.total_tokens, u64::MAX);
        assert_eq!(row.cost_usd, u64::MAX as f64 / NANOS_PER_USD);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 24,
            ..Default::default()
        })]

        /// Whatever the token counts, every group's sums are the exact sums
        /// capped at u64::MAX, grouped or not.
        #[test]
        fn aggregates_are_exact_sums_capped_at_the_top(
            calls in proptest::collection::vec(
                (
                    0u8..3,
                    proptest::prop_oneof![0u64..1_000_000, (u64::MAX - 1_000_000)..=u64::MAX],
                    proptest::prop_oneof![0u64..1_000_000, (u64::MAX - 1_000_000)..=u64::MAX],
                    200u16..600,
                ),
                1..24,
            )
        ) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let agg = rt.block_on(priced(
                dir.path(),
                aigw_shared::domain::Cost { input_per_1k: 0.5, output_per_1k: 2.0 },
            ));
            let now = unix_ms_now();
            let events: Vec<UsageEvent> = calls
                .iter()
                .enumerate()
                .map(|(i, (key, p, c, status))| UsageEvent {
                    api_key_id: format!("k{key}"),
                    prompt_tokens: *p,
                    completion_tokens: *c,
                    status: u32::from(*status),
                    ..event(uuid_v7_floor(now + i as i64), now)
                })
                .collect();
            // Ingested in two batches, as JetStream may deliver them.
            let (a, b) = events.split_at(events.len() / 2);
            agg.ingest(a).unwrap();
            agg.ingest(b).unwrap();

            let capped = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
            // Exact sums in u128 (requests, errors, prompt, completion), capped.
            let expect = |filter: &dyn Fn(u8) -> bool| {
                let mut sums = [0u128; 4];
                for &(_, p, c, status) in calls.iter().filter(|c| filter(c.0)) {
                    sums[0] += 1;
                    sums[1] += u128::from(status >= 400);
                    sums[2] += u128::from(p);
                    sums[3] += u128::from(c);
                }
                (capped(sums[0]), capped(sums[1]), capped(sums[2]), capped(sums[3]))
            };
            let got = |r: &UsageRow| (r.requests, r.errors, r.prompt_tokens, r.completion_tokens);

            let total = agg.query(&UsageQuery::default());
            proptest::prop_assert_eq!(total.len(), 1);
            proptest::prop_assert_eq!(got(&total[0]), expect(&|_| true));
            proptest::prop_assert_eq!(
                total[0].total_tokens,
                total[0].prompt_tokens.saturating_add(total[0].completion_tokens)
            );
            let by_key = agg.query(&UsageQuery {
                group_by: vec![Dimension::ApiKey],
                ..Default::default()
            });
            for row in &by_key {
                let key: u8 = row.group["api_key"][1..].parse().unwrap();
                proptest::prop_assert_eq!(got(row), expect(&|k| k == key));
                proptest::prop_assert!(row.cost_usd <= total[0].cost_usd);
                proptest::prop_assert!(row.cost_usd.is_finite() && row.cost_usd >= 0.0);
            }
        }
    }

    #[test]
    fn v7_floor_sorts_with_real_ids_of_the_same_millisecond() {
        let ms = 1_800_000_000_123;
        let floor = uuid_v7_floor(ms);
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, 123_000_000);
        let real = uuid::Uuid::new_v7(ts).to_string();
        assert!(floor <= real, "{floor} > {real}");
        assert!(uuid_v7_floor(ms - 1) < floor);
        assert!(uuid_v7_floor(ms + 1) > real);
    }

    #[tokio::test]
    async fn ids_older_than_the_window_are_forgotten_and_old_events_refused() {
        let dir = tempfile::tempdir().unwrap();
        let agg = aggregator(dir.path()).await;
        let now = unix_ms_now();
        // Given two counted events whose ids were minted now and in two days.
        let (now_id, later_id) = (uuid_v7_floor(now), uuid_v7_floor(now + 48 * HOUR_MS));
        let s = agg
            .ingest(&[event(now_id.clone(), now), event(later_id.clone(), now)])
            .unwrap();
        assert_eq!((s.counted, s.duplicates), (2, 0));

        // When the dedup table is pruned eight days and an hour from now,
        let removed = agg
            .prune_seen(now + DEDUP_WINDOW.as_millis() as i64 + HOUR_MS)
            .unwrap();

        // then only the older id is forgotten.
        assert_eq!(removed, 1);
        let s = agg
            .ingest(&[event(later_id, now), event(now_id, now)])
            .unwrap();
        assert_eq!((s.counted, s.duplicates), (1, 1));

        // An event older than the window is refused, not counted.
        let old = now - DEDUP_WINDOW.as_millis() as i64 - HOUR_MS;
        let s = agg.ingest(&[event(uuid_v7_floor(old), old)]).unwrap();
        assert_eq!((s.counted, s.duplicates, s.too_old), (0, 0, 1));
    }
}
