//! Console sessions: random ids in an HttpOnly, SameSite=Strict cookie, kept
//! in memory (a restarted control plane signs everyone out), each with its
//! own CSRF token, an expiry, and revocable one by one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "aigw_console";
/// The sign-in form's CSRF cookie (there is no session yet to hold a token).
pub const LOGIN_COOKIE: &str = "aigw_console_login";
/// Sessions kept at most; the oldest go first (a flood of sign-ins cannot grow memory).
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything the admin API allows.
    Admin,
    /// Reads only; no secret is ever shown to anyone.
    Viewer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// A signed-in person.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// `key:<digest prefix>` or `oidc:<claim value>`; the events' actor is `console:` + this.
    pub identity: String,
    pub role: Role,
    pub csrf: String,
    pub created: time::OffsetDateTime,
    expires: Instant,
}

impl Session {
    pub fn actor(&self) -> String {
        format!("console:{}", self.identity)
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, presented: &str) -> bool {
        same(&self.csrf, presented)
    }

    /// A short, non-secret handle for the sessions page (never the id itself).
    pub fn handle(&self) -> String {
        handle_of(&self.id)
    }
}

/// Constant-time string equality (for tokens).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn handle_of(id: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(id.as_bytes())[..6])
}

/// 32 random bytes as hex.
pub fn random_token() -> String {
    hex::encode(aigw_shared::crypto::new_data_key())
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn create(&self, identity: String, role: Role, ttl: Duration) -> Session {
        let now = Instant::now();
        // `ttl` is bounded by config validation (at most 7 days); a clock that
        // cannot go that far ends the session now rather than panicking.
        let expires = now.checked_add(ttl).unwrap_or(now);
        let s = Session {
            id: random_token(),
            identity,
            role,
            csrf: random_token(),
            created: time::OffsetDateTime::now_utc(),
            expires,
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.values().min_by_key(|s| s.expires).map(|s| s.id.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(s.id.clone(), s.clone());
        s
    }

    /// The live session with this id; an expired one is removed.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn revoke(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Revokes the session shown as `handle` on the sessions page.
    pub fn revoke_handle(&self, handle: &str) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let id = map.keys().find(|id| handle_of(id) == handle).cloned();
        id.map(|id| map.remove(&id).is_some()).unwrap_or(false)
    }

    /// Live sessions, newest first.
    pub fn list(&self) -> Vec<Session> {
        let now = Instant::now();
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Session> = map.values().filter(|s| s.expires > now).cloned().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.created));
        v
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, path-scoped to the console.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/console; HttpOnly; SameSite=Strict");
    match max_age {
        Some(d) => c.push_str(&format!("; Max-Age={}", d.as_secs())),
        None => c.push_str("; Max-Age=0"),
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_are_revoked() {
        let sessions = Sessions::default();
        let s = sessions.create("key:ab".into(), Role::Admin, Duration::from_secs(60));
        assert_eq!(sessions.get(&s.id).unwrap().identity, "key:ab");
        assert!(sessions.get("nope").is_none());
        assert!(sessions.revoke_handle(&s.handle()));
        assert!(sessions.get(&s.id).is_none());
        let short = sessions.create("k".into(), Role::Viewer, Duration::ZERO);
        assert!(sessions.get(&short.id).is_none());
    }

    #[test]
    fn cookies_are_parsed_and_set_strict() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; aigw_console=xyz".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
        let c = set_cookie(COOKIE, "v", Some(Duration::from_secs(5)), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
