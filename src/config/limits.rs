//! The bounds every value from the environment is held to (issue #16), and the pure checks
//! behind them: control characters, lengths, host names, URLs, AWS regions.
//!
//! Each maximum is in the README's environment table. They exist because a value past them is
//! a mistake, never a setting: `DRAIN_TIMEOUT_SEC=10000000000000000000` used to be accepted and
//! then overflow the drain's deadline at SIGTERM, after the runner was registered.

use std::net::IpAddr;

/// The longest value of any variable, in bytes (a PEM key or a JIT configuration is a few KiB).
pub const MAX_VALUE_LEN: usize = 32 * 1024;
/// A DNS name (RFC 1035: 253 characters, labels of at most 63).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// A runner label, as GitHub's API takes it.
pub const MAX_LABEL_LEN: usize = 256;
/// A URL of an outside endpoint.
pub const MAX_URL_LEN: usize = 2048;
/// An AWS region name (the longest today, `ap-southeast-5` or `us-gov-west-1`, is 14).
pub const MAX_REGION_LEN: usize = 32;
/// An SSH user name in `CI_STORAGE_HOST` (useradd's limit).
pub const MAX_SSH_USER_LEN: usize = 32;

/// `DRAIN_TIMEOUT_SEC`: 5 days, the longest a job may run on a self-hosted runner.
pub const MAX_DRAIN_TIMEOUT_SEC: u64 = 5 * DAY;
/// `RUNNER_STOP_GRACE_SEC`: an hour (a cancelled job's post steps, at most).
pub const MAX_STOP_GRACE_SEC: u64 = HOUR;
/// `DEBUG_SHUTDOWN_DELAY_SEC`: an hour.
pub const MAX_SHUTDOWN_DELAY_SEC: u64 = HOUR;
/// `RUNNER_LOCK_TIMEOUT_SEC`: a week.
pub const MAX_LOCK_TIMEOUT_SEC: u64 = 7 * DAY;
/// `RUNNER_SWEEP_OFFLINE_SEC`: a year.
pub const MAX_SWEEP_OFFLINE_SEC: u64 = 365 * DAY;
/// `CI_STORAGE_MAX_AGE_SEC`: 30 days.
pub const MAX_STORAGE_MAX_AGE_SEC: u64 = 30 * DAY;
/// `CI_STORAGE_TIMEOUT_SEC`: a day.
pub const MAX_STORAGE_TIMEOUT_SEC: u64 = DAY;
/// `CI_STORAGE_CONNECT_TIMEOUT_SEC` and `CI_STORAGE_STALL_TIMEOUT_SEC`: an hour.
pub const MAX_STORAGE_WAIT_SEC: u64 = HOUR;
/// `FORWARD_CONNECT_TIMEOUT_SEC`: an hour.
pub const MAX_FORWARD_CONNECT_TIMEOUT_SEC: u64 = HOUR;
/// `FORWARD_UDP_IDLE_SEC`: a day.
pub const MAX_FORWARD_UDP_IDLE_SEC: u64 = DAY;
/// `CLOUDWATCH_HEARTBEAT_SEC`: a day.
pub const MAX_CLOUDWATCH_HEARTBEAT_SEC: u64 = DAY;
/// `SPOT_POLL_SEC`: 10 minutes (a spot notice gives two).
pub const MAX_SPOT_POLL_SEC: u64 = 600;
/// `CONTROLLER_MAX_LIFETIME_SEC` and a pool's `max_lifetime_sec`: a week.
pub const MAX_CONTROLLER_LIFETIME_SEC: u64 = 7 * DAY;
/// `CONTROLLER_MAX_BODY_BYTES`: GitHub caps a webhook delivery at 25 MB.
pub const MAX_CONTROLLER_BODY_BYTES: usize = 25 * 1024 * 1024;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// Variables whose value is several lines by nature (PEM and OpenSSH keys).
pub const MULTILINE_VARS: &[&str] = &["GH_APP_PRIVATE_KEY", "CI_STORAGE_PRIVATE_KEY"];
/// Variables that are whitespace-separated lists, where a newline or a tab separates too.
pub const LIST_VARS: &[&str] = &["FORWARD_HOST", "FORWARD_PORTS"];

/// `now + d`, or a century from `now` when that would overflow the clock: a deadline computed
/// from a configured duration never panics.
pub fn later(now: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d).or_else(|| now.checked_add(CENTURY)).unwrap_or(now)
}

/// [`later`] on tokio's clock.
pub fn later_tokio(now: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(later(now.into_std(), d))
}

/// `secs` in the largest whole unit, for messages: `432000` is "5 days".
pub fn human_seconds(secs: u64) -> String {
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match secs {
        s if s >= DAY && s % DAY == 0 => plural(s / DAY, "day"),
        s if s >= HOUR && s % HOUR == 0 => plural(s / HOUR, "hour"),
        s if s >= 60 && s % 60 == 0 => plural(s / 60, "minute"),
        s => plural(s, "second"),
    }
}

/// Why `value` of `var` is refused as a whole, before any parsing: too long, or a control
/// character (a newline in a token or a URL is a paste error, and some parsers drop it
/// silently). Keys may span lines; lists may be split by newlines and tabs.
pub fn refused(var: &str, value: &str) -> Option<String> {
    if value.len() > MAX_VALUE_LEN {
        return Some(format!("a value of at most {MAX_VALUE_LEN} bytes (this one has {})", value.len()));
    }
    let allowed = |c: char| {
        (MULTILINE_VARS.contains(&var) && matches!(c, '\n' | '\r' | '\t'))
            || (LIST_VARS.contains(&var) && matches!(c, '\n' | '\t'))
    };
    let bad = value.chars().find(|&c| c.is_control() && !allowed(c))?;
    Some(format!("no control characters (found {bad:?})"))
}

/// A host as a connection takes it: a DNS name of at most [`MAX_HOSTNAME_LEN`] characters
/// (labels of 1-63 letters, digits, `-` and `_`, not starting or ending with `-`), an IPv4
/// address, or an IPv6 address, bare or in brackets.
pub fn valid_host(h: &str) -> bool {
    let inner = h.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    if let Some(ip) = inner {
        return ip.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = h.strip_suffix('.').unwrap_or(h);
    !name.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// An SSH user name: 1-32 characters of A-Z a-z 0-9 . _ - (not starting with `-`).
pub fn valid_ssh_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= MAX_SSH_USER_LEN
        && !u.starts_with('-')
        && u.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An `http://` or `https://` URL with a host and a valid port (1-65535), no user or password
/// (the URL is logged), no whitespace, at most [`MAX_URL_LEN`] characters; `Err` says what is
/// wrong with it.
pub fn http_url(s: &str) -> Result<reqwest::Url, String> {
    if s.len() > MAX_URL_LEN {
        return Err(format!("at most {MAX_URL_LEN} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("no spaces or control characters".into());
    }
    let url = reqwest::Url::parse(s).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme http or https, not {}", url.scheme()));
    }
    match url.host_str() {
        None | Some("") => return Err("a host".into()),
        Some(h) if h.len() > MAX_HOSTNAME_LEN => {
            return Err(format!("a host of at most {MAX_HOSTNAME_LEN} characters"))
        }
        Some(_) => {}
    }
    if url.port() == Some(0) {
        return Err("a port from 1 to 65535".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("no user or password in the URL (it is logged)".into());
    }
    Ok(url)
}

/// An AWS region name: lowercase letters, digits and single `-`, starting with a letter,
/// at most [`MAX_REGION_LEN`] characters, e.g. `us-east-1`.
pub fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= MAX_REGION_LEN
        && r.starts_with(|c: char| c.is_ascii_lowercase())
        && !r.ends_with('-')
        && !r.contains("--")
        && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_length_refuse_a_value() {
        assert_eq!(refused("GH_TOKEN", "ghp_abc"), None);
        assert!(refused("GH_TOKEN", "ghp_a\nbc").is_some_and(|w| w.contains("'\\n'")));
        assert!(refused("GH_TOKEN", "ghp\u{1b}[0m").is_some());
        assert!(refused("GH_LABELS", "a,b\tc").is_some());
        assert!(refused("X", &"a".repeat(MAX_VALUE_LEN + 1)).is_some_and(|w| w.contains("32768")));
        assert_eq!(refused("X", &"a".repeat(MAX_VALUE_LEN)), None);
        // A key spans lines; a list may be split by newlines; neither takes other controls.
        assert_eq!(refused("GH_APP_PRIVATE_KEY", "-----BEGIN\r\nx\n-----END"), None);
        assert!(refused("GH_APP_PRIVATE_KEY", "a\0b").is_some());
        assert_eq!(refused("FORWARD_PORTS", "22\n53/udp\t80"), None);
        assert!(refused("FORWARD_PORTS", "22\r53").is_some());
    }

    #[test]
    fn hosts_are_dns_names_or_ip_addresses() {
        for ok in ["storage", "storage.example.com", "a-b_c.example.", "127.0.0.1", "::1", "[::1]", "10.0.0.1"] {
            assert!(valid_host(ok), "{ok}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = vec!["a".repeat(63); 5].join(".");
        assert_eq!(long_name.len(), 319);
        for bad in
            ["", "host:notaport", "a b", "-a.com", "a-.com", "a..b", "[127.0.0.1]", &long_label, &long_name, "h/x"]
        {
            assert!(!valid_host(bad), "{bad:?}");
        }
        assert!(!valid_host(&"a".repeat(70_000)));
    }

    #[test]
    fn urls_need_a_scheme_a_host_and_a_valid_port() {
        for ok in ["https://github.com", "http://127.0.0.1:8000/api/v3", "https://[::1]:443", "http://h:65535"] {
            assert!(http_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://github.com:99999",
            "https://github.com:0",
            "https://git\nhub.com",
            "https://github.com/\tx",
            "ftp://x",
            "https://",
            "github.com",
            "https://user:pw@github.com",
            "https://a b",
        ] {
            assert!(http_url(bad).is_err(), "{bad:?}");
        }
        let long = format!("https://{}.com", "a".repeat(MAX_URL_LEN));
        assert!(http_url(&long).is_err());
    }

    #[test]
    fn regions_and_ssh_users() {
        for ok in ["us-east-1", "eu-central-2", "us-gov-west-1", "local"] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in ["", "US-EAST-1", "us_east_1", "-us", "us-", "us--east", "1us", &"a".repeat(33)] {
            assert!(!valid_region(bad), "{bad:?}");
        }
        assert!(valid_ssh_user("guest") && valid_ssh_user("ci.user-1"));
        assert!(!valid_ssh_user("-oProxyCommand") && !valid_ssh_user("a b") && !valid_ssh_user(&"u".repeat(33)));
    }

    #[test]
    fn a_deadline_past_the_clock_s_end_saturates_instead_of_panicking() {
        use std::time::{Duration, Instant};
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        let far = later(now, Duration::from_secs(10_000_000_000_000_000_000));
        assert!(far > now + Duration::from_secs(99 * 365 * 86_400), "not far enough: {:?}", far - now);
        assert!(later(now, Duration::MAX) > now);
        let t = tokio::time::Instant::now();
        assert!(later_tokio(t, Duration::MAX) > t);
    }

    #[test]
    fn seconds_read_in_their_largest_unit() {
        assert_eq!(human_seconds(MAX_DRAIN_TIMEOUT_SEC), "5 days");
        assert_eq!(human_seconds(3600), "1 hour");
        assert_eq!(human_seconds(600), "10 minutes");
        assert_eq!(human_seconds(90), "90 seconds");
    }
}
