//! Token counts with compact byte-pair-encoding tables.
//!
//! Counts exactly what tiktoken's `count_ordinary` counts: the text is split
//! with the encoding's pattern, a piece found in the vocabulary is one token,
//! any other piece is merged pair by pair, lowest rank first (leftmost among
//! equals), and counts the parts left. What differs is storage: the
//! vocabulary is embedded in the binary in rank order (written by
//! `build.rs` from tiktoken-rs's tables) and indexed at load by an
//! open-addressed table of ranks: ~3 MiB for o200k, where
//! `tiktoken_rs::CoreBPE` builds three hash maps of owned byte vectors and
//! 256 regex copies (~50 MiB, most of it kept by the allocator even once
//! dropped). tiktoken-rs's own counts are the oracle of the tests below.
//!
//! Long pieces (a caller's unbroken run of letters) are merged with a heap
//! instead of tiktoken's rescans, so one hostile prompt costs `n log n`, not
//! `n²`: the merge order, hence the count, is the same.

use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use tiktoken_rs::tokenizer::Tokenizer;

/// No pair: merges stop when every adjacent pair has this rank.
const NONE: u32 = u32::MAX;
/// Pieces up to this many bytes are merged by rescanning (fewer allocations
/// than the heap, and quadratic cost is nothing at this size).
const RESCAN_MAX: usize = 128;

// The split patterns of OpenAI's encodings (tiktoken `openai_public.py`).
const O200K: &str = tiktoken_rs::O200K_BASE_PAT_STR;
const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
const R50K: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

// The vocabularies `build.rs` wrote (see there for the layout).
static O200K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k.bpe"));
static CL100K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k.bpe"));
static P50K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/p50k.bpe"));
static R50K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/r50k.bpe"));

pub struct Bpe {
    /// Every token's bytes, in rank order.
    arena: &'static [u8],
    /// `ends[r]`: where token `r` ends in `arena` (it starts where `r - 1` ends).
    ends: Box<[u32]>,
    /// Open addressing, linear probing: `rank + 1`, 0 for an empty slot.
    slots: Box<[u32]>,
    split: fancy_regex::Regex,
}

impl Bpe {
    /// `t`'s vocabulary, indexed (~20 ms for o200k).
    pub fn load(t: Tokenizer) -> Result<Self, String> {
        let (table, pattern) = match t {
            Tokenizer::O200kBase | Tokenizer::O200kHarmony => (O200K_TABLE, O200K),
            Tokenizer::Cl100kBase => (CL100K_TABLE, CL100K),
            // p50k_edit differs from p50k only in special tokens.
            Tokenizer::P50kBase | Tokenizer::P50kEdit => (P50K_TABLE, R50K),
            Tokenizer::R50kBase | Tokenizer::Gpt2 => (R50K_TABLE, R50K),
        };
        let split = fancy_regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        Self::index(table, split).ok_or_else(|| format!("{t:?}: a malformed token table"))
    }

    fn index(table: &'static [u8], split: fancy_regex::Regex) -> Option<Self> {
        let count = u32::from_le_bytes(table.get(..4)?.try_into().ok()?) as usize;
        let lens = table.get(4..4 + 2 * count)?;
        let arena = table.get(4 + 2 * count..)?;
        let size = (count * 2).next_power_of_two();
        let mut ends = Vec::with_capacity(count);
        let mut slots = vec![0u32; size].into_boxed_slice();
        let mut end = 0usize;
        for (rank, len) in lens.chunks_exact(2).enumerate() {
            let start = end;
            end += usize::from(u16::from_le_bytes([len[0], len[1]]));
            ends.push(u32::try_from(end).ok()?);
            let token = arena.get(start..end)?;
            if token.is_empty() {
                continue;
            }
            let mut i = slot_of(token, size);
            while slots[i] != 0 {
                i = (i + 1) & (size - 1);
            }
            slots[i] = rank as u32 + 1;
        }
        (end == arena.len() && count >= 256).then(|| Self {
            arena,
            ends: ends.into_boxed_slice(),
            slots,
            split,
        })
    }

    /// Tokens in `text`, special-token text counted as ordinary text.
    pub fn count(&self, text: &str) -> usize {
        let mut n = 0usize;
        let mut done = 0;
        for m in self.split.find_iter(text) {
            let Ok(m) = m else {
                // The pattern's backtracking limit: a token is at least a
                // byte, so the rest's length bounds its count from above (a
                // limit errs towards admitting less).
                return n.saturating_add(text.len().saturating_sub(done));
            };
            done = m.end();
            let piece = m.as_str().as_bytes();
            n = n.saturating_add(if self.rank(piece).is_some() {
                1
            } else if piece.len() <= RESCAN_MAX {
                self.merged_by_rescan(piece)
            } else {
                self.merged_by_heap(piece)
            });
        }
        n
    }

    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        let start = if r == 0 { 0 } else { self.ends[r - 1] as usize };
        &self.arena[start..self.ends[r] as usize]
    }

    fn rank(&self, bytes: &[u8]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = slot_of(bytes, self.slots.len());
        loop {
            match self.slots[i] {
                0 => return None,
                s if self.token(s - 1) == bytes => return Some(s - 1),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn rank_or_none(&self, bytes: &[u8]) -> u32 {
        self.rank(bytes).unwrap_or(NONE)
    }

    /// Parts left after merging `piece` (≥ 2 bytes): `starts[i]` is where
    /// part `i` begins, `pairs[i]` the rank of parts `i` and `i + 1` joined.
    fn merged_by_rescan(&self, piece: &[u8]) -> usize {
        let mut starts: Vec<usize> = (0..=piece.len()).collect();
        let mut pairs: Vec<u32> = (0..piece.len() - 1)
            .map(|i| self.rank_or_none(&piece[i..i + 2]))
            .collect();
        loop {
            let mut best = (NONE, 0);
            for (i, &r) in pairs.iter().enumerate() {
                if r < best.0 {
                    best = (r, i);
                }
            }
            let (rank, i) = best;
            if rank == NONE {
                return starts.len() - 1;
            }
            // Part i absorbs part i + 1.
            starts.remove(i + 1);
            pairs.remove(i);
            let joined = |j: usize| match starts.get(j + 2) {
                Some(&end) => self.rank_or_none(&piece[starts[j]..end]),
                None => NONE,
            };
            if i < pairs.len() {
                pairs[i] = joined(i);
            }
            if i > 0 {
                pairs[i - 1] = joined(i - 1);
            }
        }
    }

    /// The same merges as [`Self::merged_by_rescan`], found with a heap of
    /// `(rank, start)` (a part keeps its start when it absorbs its right
    /// neighbour, so stale entries are recognised and skipped).
    fn merged_by_heap(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // Parts as a linked list over byte positions: `next[s]` is where the
        // part starting at `s` ends; `prev[s]` where its left neighbour starts.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|s| s.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut pair = vec![NONE; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for s in 0..n - 1 {
            pair[s] = self.rank_or_none(&piece[s..s + 2]);
            if pair[s] != NONE {
                heap.push(std::cmp::Reverse((pair[s], s)));
            }
        }
        let mut parts = n;
        let joined = |s: usize, next: &[usize]| -> u32 {
            let mid = next[s];
            if mid >= n {
                return NONE;
            }
            self.rank_or_none(&piece[s..next[mid]])
        };
        while let Some(std::cmp::Reverse((rank, s))) = heap.pop() {
            if !alive[s] || pair[s] != rank {
                continue;
            }
            let right = next[s];
            next[s] = next[right];
            alive[right] = false;
            if next[s] < n {
                prev[next[s]] = s;
            }
            parts -= 1;
            pair[s] = joined(s, &next);
            if pair[s] != NONE {
                heap.push(std::cmp::Reverse((pair[s], s)));
            }
            let left = prev[s];
            if left < n {
                pair[left] = joined(left, &next);
                if pair[left] != NONE {
                    heap.push(std::cmp::Reverse((pair[left], left)));
                }
            }
        }
        parts
    }
}

fn slot_of(bytes: &[u8], size: usize) -> usize {
    let h = rustc_hash::FxBuildHasher.hash_one(bytes);
    // The high bits: Fx mixes upwards.
    (h >> (64 - size.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts() -> Vec<String> {
        let mut t: Vec<String> = [
            "",
            "a",
            "Hello, how are you?",
            "What is 4200 + 42? It's 4242, isn't it… I'LL check.",
            "  leading and trailing spaces   \n\n\r\n\ttabs\t and\u{a0}nbsp",
            "<|endoftext|> is text here, not a special token",
            "ünïcödé ÀÉÎÕÜ 日本語のテキスト 中文文本 한국어 텍스트 Ελληνικά Русский текст",
            "emoji 👩‍👩‍👧‍👦🏳️‍🌈 and 🚀🚀🚀 combined",
            "fn main() { println!(\"{}\", 1_000_000usize.pow(2)); } // code\n    indented();",
            "{\"json\": [1, 2.5e10, -3, null, true], \"nested\": {\"k\": \"v\"}}",
            "https://example.com/path?query=value&other=1#frag user@example.org",
            "1234567890 12 345 6789 0.000001 -42 +7 1e9",
            "ＦＵＬＬＷＩＤＴＨ and　ideographic　space",
            "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve",
            "\u{0}\u{1}\u{7f} control \u{200b}zero width\u{feff}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Pieces past RESCAN_MAX: one unbroken run each, merged with the heap.
        t.push("a".repeat(1000));
        t.push("ab".repeat(700));
        t.push("Supercalifragilisticexpialidocious".repeat(40));
        t.push("日本語".repeat(200));
        t.push("x".repeat(129) + " " + &"0123456789".repeat(30));
        t.push("🚀".repeat(300));
        // Random bytes from a small seeded generator, as UTF-8 lossy text.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in [7, 63, 200, 2000] {
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push((seed % 256) as u8);
            }
            t.push(String::from_utf8_lossy(&bytes).into_owned());
            let ascii: String = bytes.iter().map(|b| (b' ' + b % 95) as char).collect();
            t.push(ascii);
        }
        t
    }

    /// tiktoken-rs's own counts are the oracle, for every encoding aigw picks.
    #[test]
    fn counts_what_tiktoken_counts() {
        for t in [
            Tokenizer::O200kBase,
            Tokenizer::Cl100kBase,
            Tokenizer::P50kBase,
            Tokenizer::R50kBase,
            Tokenizer::P50kEdit,
        ] {
            let ours = Bpe::load(t).unwrap();
            let theirs = tiktoken_rs::bpe_for_tokenizer(t).unwrap();
            for text in texts() {
                assert_eq!(
                    ours.count(&text),
                    theirs.count_ordinary(&text),
                    "{t:?}: {:?}",
                    text.chars().take(60).collect::<String>()
                );
            }
        }
    }

    #[test]
    fn both_merge_orders_agree_on_long_pieces() {
        let ours = Bpe::load(Tokenizer::O200kBase).unwrap();
        for text in texts() {
            for m in ours.split.find_iter(&text) {
                let piece = m.unwrap().as_str().as_bytes();
                if piece.len() >= 2 {
                    assert_eq!(ours.merged_by_rescan(piece), ours.merged_by_heap(piece));
                }
            }
        }
    }

    #[test]
    fn a_long_hostile_piece_is_counted_in_n_log_n() {
        // 256 KB of one letter is one piece: tiktoken's rescans take tens of
        // seconds on it, the heap milliseconds.
        let ours = Bpe::load(Tokenizer::O200kBase).unwrap();
        let text = "q".repeat(256 << 10);
        let n = ours.count(&text);
        assert!(n > 0 && n < text.len(), "{n}");
    }

    #[test]
    fn the_tables_are_compact() {
        let ours = Bpe::load(Tokenizer::O200kBase).unwrap();
        let bytes = ours.arena.len() + 4 * (ours.ends.len() + ours.slots.len());
        assert_eq!(ours.ends.len(), 199_998);
        assert!(bytes < 5 << 20, "{bytes} bytes");
    }

    #[test]
    fn a_malformed_table_is_refused() {
        let split = || fancy_regex::Regex::new(R50K).unwrap();
        for bad in [&b""[..], b"\x05\x00\x00\x00\x01\x00", b"\xff\xff\xff\xff"] {
            assert!(Bpe::index(bad, split()).is_none());
        }
    }
}
