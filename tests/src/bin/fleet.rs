//! `fleet [CSV]`: the fleet simulation of issue 11 item 5 (`bash tests/bench/fleet/run.sh`).
//!
//! 100,000 devices enroll at uniformly random instants within one hour and then run `enroll-agent
//! run` for two certificate lifetimes (90-day certificates, 180 days). A discrete-event simulation
//! (a binary heap of (time, device), one-second resolution) replays what `daemon::run` does, with
//! the agent's own scheduling rules called from `enroll_agent::lifecycle`:
//! - an install schedules the next renewal at `guarded_renewal_time(renewal_time(not_before,
//!   not_after, policy, sample), install)` (lifecycle.rs `commit` and `Agent::renew_at`). `run`
//!   wakes at least hourly, but a wake before that time answers "not due" without asking the CA,
//!   so the only CA requests are enrollments, renewals and their retries;
//! - a failed request pauses `backoff(failures, policy, sample)`, `failures` counting from 0 since
//!   the last success (daemon.rs `run`).
//!
//! The CA is down for 24 hours from day 59 00:00, in the middle of the first renewal wave: every
//! request then fails as a connection error does, without Retry-After (nothing answers while the
//! CA is unreachable). The CA issues at once (no pending state); one request per attempt. Policy:
//! the defaults (at_fraction 0.66, jitter_fraction 0.05, retry 30 s doubling to 21,600 s).
//!
//! Today's policy misses the goal of issue 11 (steady peak ≤ 1.2 × mean, post-outage peak ≤ 2 ×
//! mean), so two changes are modelled here, labelled PROPOSAL (P1, P2), still built on the agent's
//! own functions; P2 is `lifecycle::retry_pause` itself. The seed is fixed (`FLEET_SEED`
//! overrides it), so a run prints the same figures every time.
//!
//! Prints the figures; with CSV, writes the requests per minute of each policy (one column each).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;

use enroll_agent::config::RenewalPolicy;
use enroll_agent::lifecycle::{self, backoff, guarded_renewal_time, renewal_time};

const DEVICES: usize = 100_000;
const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;
/// A usual lifetime for device certificates (and the longest public CAs move to).
const LIFETIME: u64 = 90 * DAY;
const HORIZON: u64 = 2 * LIFETIME;
const ENROLL_WINDOW: u64 = HOUR;
const OUTAGE_START: u64 = 59 * DAY;
const OUTAGE_END: u64 = OUTAGE_START + DAY;
/// Steady renewals: from day 1 (after the enrollment hour) to the end, without the outage and the
/// 4 days after it (P2 spreads the outage's retries over up to 3.8 days).
const STEADY_FROM: u64 = DAY;
const AFTERMATH: u64 = 4 * DAY;
const SEED: u64 = 0x5eed_f1ee7;

/// One policy: today's, or today's with proposals.
#[derive(Clone, Copy)]
struct Rules {
    name: &'static str,
    /// PROPOSAL P1: the first renewal after an enrollment draws its at_fraction uniformly from
    /// (0, at_fraction], so a fleet enrolled together renews spread over a whole renewal period
    /// instead of in waves 2 × jitter_fraction × lifetime wide (9 days), 59 days apart.
    spread_first_renewal: bool,
    /// P2 (now the agent's policy): see `enroll_agent::lifecycle::retry_pause`.
    spread_renewal_retries: bool,
    /// A parameter change only, for comparison: `renewal.retry_max_s`.
    retry_max_s: Option<u64>,
}

const POLICIES: [Rules; 4] = [
    Rules { name: "today", spread_first_renewal: false, spread_renewal_retries: false, retry_max_s: None },
    Rules { name: "P1", spread_first_renewal: true, spread_renewal_retries: false, retry_max_s: None },
    Rules {
        name: "P1+max1d",
        spread_first_renewal: true,
        spread_renewal_retries: false,
        retry_max_s: Some(DAY),
    },
    Rules { name: "P1+P2", spread_first_renewal: true, spread_renewal_retries: true, retry_max_s: None },
];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), as `lifecycle::random_unit`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The policy `commit` passes to `renewal_time` (P1: `phase` uniform in [0, 1) after an
/// enrollment).
fn renewal_policy(policy: &RenewalPolicy, first: bool, rules: Rules, phase: f64) -> RenewalPolicy {
    let mut renewal = *policy;
    if first && rules.spread_first_renewal {
        renewal.at_fraction *= 1.0 - phase;
    }
    renewal
}

struct Device {
    /// not_after of the installed certificate.
    valid_until: Option<u64>,
    /// Consecutive failures, as `run` counts them.
    failures: u32,
}

/// Requests per minute at the CA over the horizon.
fn simulate(rules: Rules, outage: bool) -> Vec<u32> {
    let mut policy = RenewalPolicy::default();
    if let Some(max) = rules.retry_max_s {
        policy.retry_max_s = max;
    }
    let mut rng = Rng(std::env::var("FLEET_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED));
    let mut counts = vec![0u32; (HORIZON / MINUTE) as usize];
    let mut devices: Vec<Device> = (0..DEVICES).map(|_| Device { valid_until: None, failures: 0 }).collect();
    let mut queue: BinaryHeap<Reverse<(u64, u32)>> =
        (0..DEVICES as u32).map(|id| Reverse((rng.next() % ENROLL_WINDOW, id))).collect();
    while let Some(Reverse((now, id))) = queue.pop() {
        if now >= HORIZON {
            break;
        }
        counts[(now / MINUTE) as usize] += 1;
        let device = &mut devices[id as usize];
        let next = if outage && (OUTAGE_START..OUTAGE_END).contains(&now) {
            let pause = if rules.spread_renewal_retries {
                lifecycle::retry_pause(device.failures, &policy, device.valid_until, now, rng.unit())
                    .as_secs()
            } else {
                backoff(device.failures, &policy, rng.unit()).as_secs()
            };
            device.failures = device.failures.saturating_add(1);
            now + pause
        } else {
            let (not_before, not_after) = (now, now + LIFETIME);
            let renewal = renewal_policy(&policy, device.valid_until.is_none(), rules, rng.unit());
            let renew_at = renewal_time(not_before, not_after, &renewal, rng.unit() * 2.0 - 1.0);
            device.valid_until = Some(not_after);
            device.failures = 0;
            guarded_renewal_time(renew_at, Some(now), &policy)
        };
        queue.push(Reverse((next, id)));
    }
    counts
}

/// Whether minute `m` belongs to the steady window.
fn steady(m: usize) -> bool {
    let t = m as u64 * MINUTE;
    t >= STEADY_FROM && !(OUTAGE_START..OUTAGE_END + AFTERMATH).contains(&t)
}

/// Peak ÷ mean over the steady window with buckets of `width` minutes (whole buckets inside the
/// window only), and the mean in requests per minute.
fn steady_ratio(counts: &[u32], width: usize) -> (f64, f64) {
    let (mut total, mut minutes, mut peak) = (0u64, 0usize, 0u64);
    for (i, bucket) in counts.chunks(width).enumerate() {
        if bucket.len() == width && (0..width).all(|k| steady(i * width + k)) {
            let sum: u64 = bucket.iter().map(|&c| u64::from(c)).sum();
            total += sum;
            minutes += width;
            peak = peak.max(sum);
        }
    }
    let mean = total as f64 / minutes as f64;
    (peak as f64 / width as f64 / mean, mean)
}

/// The same ratio for arrivals flat by construction: as many requests as the steady window got,
/// at uniformly random minutes of it (what chance alone gives at this resolution and fleet size).
fn chance_ratio(counts: &[u32], width: usize) -> f64 {
    let minutes: Vec<usize> = (0..counts.len()).filter(|&m| steady(m)).collect();
    let total: u64 = minutes.iter().map(|&m| u64::from(counts[m])).sum();
    let mut rng = Rng(SEED ^ 0xc4a1);
    let mut flat = vec![0u32; counts.len()];
    for _ in 0..total {
        flat[minutes[(rng.next() % minutes.len() as u64) as usize]] += 1;
    }
    steady_ratio(&flat, width).0
}

/// Peak requests per minute in `width`-minute buckets over the hour after the outage.
fn after_outage_peak(counts: &[u32], width: usize) -> f64 {
    let start = (OUTAGE_END / MINUTE) as usize;
    let hour = &counts[start..start + 60];
    hour.chunks(width).map(|b| b.iter().sum::<u32>()).max().unwrap_or(0) as f64 / width as f64
}

/// Peak requests per minute in `width`-minute buckets over minutes [from, to).
fn peak(counts: &[u32], from: u64, to: u64, width: usize) -> f64 {
    let range = &counts[(from / MINUTE) as usize..(to / MINUTE) as usize];
    range.chunks(width).map(|b| b.iter().sum::<u32>()).max().unwrap_or(0) as f64 / width as f64
}

fn main() {
    let csv = std::env::args().nth(1);
    let runs: Vec<(Rules, Vec<u32>, Vec<u32>)> =
        POLICIES.iter().map(|&r| (r, simulate(r, true), simulate(r, false))).collect();

    println!(
        "{DEVICES} devices enrolled within {} h; {}-day certificates; {} days; CA down from day {} to \
         day {} (24 h, no Retry-After)",
        ENROLL_WINDOW / HOUR,
        LIFETIME / DAY,
        HORIZON / DAY,
        OUTAGE_START / DAY,
        OUTAGE_END / DAY
    );
    println!(
        "steady window: day {} to {} without days {}-{} (the outage and the 4 days after); mean = its \
         requests per minute; peak = the busiest bucket of 1 minute, 1 hour, 1 day",
        STEADY_FROM / DAY,
        HORIZON / DAY,
        OUTAGE_START / DAY,
        (OUTAGE_END + AFTERMATH) / DAY
    );
    println!(
        "after the outage: the busiest 10 minutes and the whole first hour after it, in requests per \
         minute ÷ the steady mean; 'no outage': the same 10 minutes in a run without the outage"
    );
    println!("goal: steady peak ≤ 1.2 × mean, post-outage peak ≤ 2 × mean");
    println!();
    println!(
        "{:<9} {:>8} {:>8} | {:>7} {:>7} {:>7} | {:>9} {:>9} {:>9}",
        "policy", "requests", "mean/min", "1 min", "1 h", "1 day", "after 10m", "after 1h", "no outage"
    );
    for (rules, counts, baseline) in &runs {
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let (per_minute, mean) = steady_ratio(counts, 1);
        println!(
            "{:<9} {:>8} {:>8.2} | {:>7.2} {:>7.2} {:>7.2} | {:>9.2} {:>9.2} {:>9.2}",
            rules.name,
            total,
            mean,
            per_minute,
            steady_ratio(counts, 60).0,
            steady_ratio(counts, 1440).0,
            after_outage_peak(counts, 10) / mean,
            after_outage_peak(counts, 60) / mean,
            after_outage_peak(baseline, 10) / mean,
        );
    }
    let proposal = &runs[runs.len() - 1].1;
    println!(
        "{:<9} {:>8} {:>8} | {:>7.2} {:>7.2} {:>7.2} |  (flat random arrivals, P1+P2's mean)",
        "chance",
        "",
        "",
        chance_ratio(proposal, 1),
        chance_ratio(proposal, 60),
        chance_ratio(proposal, 1440)
    );

    println!();
    println!("requests per minute at the CA (busiest bucket of 1 minute / 1 hour, as requests per minute)");
    println!(
        "{:<9} {:>15} {:>15} {:>15} {:>15} {:>15}",
        "policy", "enrollment hour", "steady", "outage (fail)", "1st hour after", "rest of 60-64"
    );
    for (rules, counts, _) in &runs {
        let pair = |from: u64, to: u64| {
            format!("{:.0} / {:.1}", peak(counts, from, to, 1), peak(counts, from, to, 60))
        };
        let steady_peaks = format!(
            "{:.0} / {:.1}",
            steady_ratio(counts, 1).0 * steady_ratio(counts, 1).1,
            steady_ratio(counts, 60).0 * steady_ratio(counts, 60).1
        );
        println!(
            "{:<9} {:>15} {:>15} {:>15} {:>15} {:>15}",
            rules.name,
            pair(0, HOUR),
            steady_peaks,
            pair(OUTAGE_START, OUTAGE_END),
            pair(OUTAGE_END, OUTAGE_END + HOUR),
            pair(OUTAGE_END + HOUR, OUTAGE_END + AFTERMATH),
        );
    }

    if let Some(path) = csv {
        let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("creating {path}: {e}"));
        let mut out = std::io::BufWriter::new(file);
        let names: Vec<&str> = runs.iter().map(|(r, ..)| r.name).collect();
        let mut write = |line: String| out.write_all(line.as_bytes()).expect("writing the CSV");
        write(format!("minute,{}\n", names.join(",")));
        for m in 0..runs[0].1.len() {
            let row: Vec<String> = runs.iter().map(|(_, c, _)| c[m].to_string()).collect();
            write(format!("{m},{}\n", row.join(",")));
        }
        out.flush().expect("writing the CSV");
    }
}
