//! One pool's decisions, as a pure state machine: which jobs wait, when a runner container
//! starts, when one is removed. No I/O: the pool's task feeds it events (deliveries, what
//! the Docker engine shows, the outcome of its own actions) and carries out its actions.
//!
//! Runner containers are fungible: GitHub gives a queued job to any idle runner whose labels
//! match, not to the one started for it. So the pool keeps enough idle runners for the jobs
//! still waiting (plus `min_idle`), at most `max` containers in all, and learns which runner
//! took which job from the `in_progress` and `completed` deliveries' `runner_name`. A
//! `completed` job only ever removes the container of the runner named in it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// How many job ids are remembered for idempotency (GitHub redelivers for up to days; the
/// ids of a busy pool's last 100,000 jobs are a few MiB at most).
const SEEN_CAP: usize = 100_000;

/// How many ended containers' names are remembered, so that a listing taken before their end
/// cannot bring them back (a listing is at most one poll old; names never repeat).
const ENDED_CAP: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The start (JIT configuration, create, upload, start) is under way.
    Starting,
    Running,
    /// Sent SIGTERM (past its lifetime, or an idle runner no job needs): the supervisor in
    /// it lets a running job finish, de-registers, and exits; removed once it has exited.
    Draining,
    Exited,
    /// Removal requested.
    Removing,
    /// The engine refused the removal: asked again at the next listing that shows it.
    RemoveFailed,
}

#[derive(Debug, Clone)]
pub struct Slot {
    pub state: SlotState,
    /// The job whose delivery started it (informational: any matching job may be taken).
    pub for_job: Option<u64>,
    /// The job it took (`in_progress` or `completed` named this runner).
    pub took: Option<u64>,
    pub completed: bool,
    pub runner_id: Option<u64>,
    pub since: Instant,
    /// When the SIGTERM was sent (`Draining`).
    pub draining_since: Option<Instant>,
}

impl Slot {
    fn idle(&self) -> bool {
        matches!(self.state, SlotState::Starting | SlotState::Running) && self.took.is_none()
    }
}

/// A container of this pool as the Docker engine shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub name: String,
    pub for_job: Option<u64>,
    pub runner_id: Option<u64>,
    pub running: bool,
    pub age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `queued` job this pool serves.
    Queued {
        job_id: u64,
    },
    InProgress {
        job_id: u64,
        runner_name: Option<String>,
    },
    Completed {
        job_id: u64,
        runner_name: Option<String>,
    },
    Started {
        name: String,
        runner_id: u64,
    },
    StartFailed {
        name: String,
    },
    /// Every container of the pool, listed by its labels; the listing was asked for at `asked`
    /// (a runner started since then is missing from it, not gone).
    Observed {
        list: Vec<Observed>,
        asked: Instant,
    },
    Removed {
        name: String,
    },
    /// The SIGTERM was not delivered; the container runs on as before.
    StopFailed {
        name: String,
    },
    /// The engine did not remove it; the container is still there.
    RemoveFailed {
        name: String,
    },
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mint a JIT configuration for runner `name` and start its container.
    Start { name: String, for_job: Option<u64> },
    /// SIGTERM to container `name`, once (a second one would escalate the supervisor's drain):
    /// the first half of `docker stop`; the pool removes it when it has exited, or, as
    /// `docker stop` kills, when the grace period has passed.
    Stop { name: String },
    /// Remove container `name`; then de-register runner `deregister` (a runner that never
    /// finished a job stays registered, offline, when its container dies).
    Remove { name: String, deregister: Option<u64> },
}

/// What became of a `queued` delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Queued,
    Duplicate,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub waiting: usize,
    pub starting: usize,
    pub idle: usize,
    pub draining: usize,
    pub busy: usize,
    pub exited: usize,
    pub containers: usize,
    pub high_water: usize,
    pub starts: u64,
    pub start_failures: u64,
    pub removals: u64,
    pub stops: u64,
    pub adopted: u64,
    pub queue_wait_sum: f64,
    pub queue_wait_count: u64,
    pub queue_wait_max: f64,
}

pub struct Pool {
    max: usize,
    min_idle: usize,
    max_lifetime: Duration,
    stop_grace: Duration,
    prefix: String,
    counter: u64,
    /// Jobs known queued on GitHub and not yet taken, oldest first, with when they came.
    waiting: VecDeque<(u64, Instant)>,
    seen: HashSet<u64>,
    seen_order: VecDeque<u64>,
    slots: BTreeMap<String, Slot>,
    /// Containers this pool ended (removed, failed to start, gone): never adopted again.
    ended: HashSet<String>,
    ended_order: VecDeque<String>,
    /// Containers an earlier run of the controller had already stopped: adopted as draining,
    /// never sent a second SIGTERM (the supervisor would escalate its drain and cancel the job).
    stopped_before: HashSet<String>,
    failures: u32,
    paused_until: Option<Instant>,
    stats: Stats,
}

/// How long a stopped runner container has to exit before it is removed by force: longer
/// than the whole drain of the supervisor in it (README "Shutdown sequence and time budgets":
/// `DRAIN_TIMEOUT_SEC` + 30 s + 20 s + 10 s + 3.5 s, plus `DEBUG_SHUTDOWN_DELAY_SEC`), read
/// from the pool's runner environment, with a margin.
pub fn stop_grace(env: &[(String, String)]) -> Duration {
    let secs = |name: &str, default: u64| {
        env.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.trim().parse::<u64>().ok()).unwrap_or(default)
    };
    Duration::from_secs(secs("DRAIN_TIMEOUT_SEC", 600) + secs("DEBUG_SHUTDOWN_DELAY_SEC", 0) + 90)
}

/// The pause after `n` failed starts in a row: 1 s, 2 s, 4 s … 60 s.
pub fn start_backoff(n: u32) -> Duration {
    Duration::from_secs((1u64 << n.saturating_sub(1).min(6)).min(60))
}

impl Pool {
    /// `prefix` names the runners: `<prefix>-<n>`; the caller makes it unique per controller
    /// start, so names never repeat across restarts.
    pub fn new(max: usize, min_idle: usize, max_lifetime: Duration, prefix: String) -> Self {
        Self {
            max: max.max(1),
            min_idle,
            max_lifetime,
            stop_grace: stop_grace(&[]),
            prefix,
            counter: 0,
            waiting: VecDeque::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            slots: BTreeMap::new(),
            ended: HashSet::new(),
            ended_order: VecDeque::new(),
            stopped_before: HashSet::new(),
            failures: 0,
            paused_until: None,
            stats: Stats::default(),
        }
    }

    fn remember(&mut self, job_id: u64) -> bool {
        if !self.seen.insert(job_id) {
            return false;
        }
        self.seen_order.push_back(job_id);
        if self.seen_order.len() > SEEN_CAP {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// The grace period of [`Action::Stop`] (default: [`stop_grace`] of no settings).
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// The containers that were draining when the controller last stopped (kept in the state
    /// directory): adopted as draining, their grace counted from now.
    pub fn with_stopped_before(mut self, names: Vec<String>) -> Self {
        self.stopped_before = names.into_iter().collect();
        self
    }

    /// The names of the containers sent their SIGTERM and not yet gone.
    pub fn draining(&self) -> Vec<String> {
        self.slots.iter().filter(|(_, s)| s.state == SlotState::Draining).map(|(n, _)| n.clone()).collect()
    }

    /// Drops slot `name` for good: a listing asked for before it ended still shows the
    /// container, and must not adopt it again (issue #18: the re-adopted container took a
    /// place under the maximum and was removed, and de-registered, a second time).
    fn end(&mut self, name: &str) -> Option<Slot> {
        let slot = self.slots.remove(name);
        if self.ended.insert(name.to_string()) {
            self.ended_order.push_back(name.to_string());
            if self.ended_order.len() > ENDED_CAP {
                if let Some(old) = self.ended_order.pop_front() {
                    self.ended.remove(&old);
                }
            }
        }
        slot
    }

    /// A `queued` job: waits for a runner unless this job id was seen before.
    pub fn admit(&mut self, job_id: u64, now: Instant) -> (Admission, Vec<Action>) {
        if !self.remember(job_id) {
            return (Admission::Duplicate, Vec::new());
        }
        self.waiting.push_back((job_id, now));
        (Admission::Queued, self.dispatch(now))
    }

    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Queued { job_id } => return self.admit(job_id, now).1,
            Event::InProgress { job_id, runner_name } => {
                self.remember(job_id);
                self.taken(job_id, now);
                if let Some(slot) = runner_name.and_then(|n| self.slots.get_mut(&n)) {
                    slot.took = Some(job_id);
                }
            }
            Event::Completed { job_id, runner_name } => {
                self.remember(job_id);
                // Cancelled while queued, or done: no runner is needed for it any more.
                self.waiting.retain(|(id, _)| *id != job_id);
                if let Some(name) = runner_name {
                    if let Some(slot) = self.slots.get_mut(&name) {
                        slot.took.get_or_insert(job_id);
                        slot.completed = true;
                        if slot.state == SlotState::Exited {
                            actions.push(self.remove(&name));
                        }
                    }
                }
            }
            Event::Started { name, runner_id } => {
                self.failures = 0;
                self.stats.starts += 1;
                if let Some(slot) = self.slots.get_mut(&name) {
                    slot.runner_id = Some(runner_id);
                    slot.since = now;
                    if slot.state == SlotState::Starting {
                        slot.state = SlotState::Running;
                    }
                }
            }
            Event::StartFailed { name } => {
                self.end(&name);
                self.stats.start_failures += 1;
                self.failures += 1;
                self.paused_until = Some(now + start_backoff(self.failures));
            }
            Event::Observed { list, asked } => actions.extend(self.observe(list, asked, now)),
            Event::Removed { name } => {
                if self.end(&name).is_some() {
                    self.stats.removals += 1;
                }
            }
            Event::StopFailed { name } => {
                if let Some(slot) = self.slots.get_mut(&name) {
                    if slot.state == SlotState::Draining {
                        // Stopped again at the next listing if it is still due.
                        slot.state = SlotState::Running;
                        slot.draining_since = None;
                    }
                }
            }
            Event::RemoveFailed { name } => {
                if let Some(slot) = self.slots.get_mut(&name) {
                    slot.state = SlotState::RemoveFailed;
                }
            }
            Event::Tick => {}
        }
        actions.extend(self.shrink(now));
        actions.extend(self.dispatch(now));
        actions
    }

    /// A runner took `job_id`: it waits no more.
    fn taken(&mut self, job_id: u64, now: Instant) {
        if let Some(i) = self.waiting.iter().position(|(id, _)| *id == job_id) {
            let (_, since) = self.waiting.remove(i).expect("position is in range");
            let wait = now.saturating_duration_since(since).as_secs_f64();
            self.stats.queue_wait_sum += wait;
            self.stats.queue_wait_count += 1;
            self.stats.queue_wait_max = self.stats.queue_wait_max.max(wait);
        }
    }

    fn remove(&mut self, name: &str) -> Action {
        let slot = self.slots.get_mut(name).expect("removing a known slot");
        slot.state = SlotState::Removing;
        // A runner whose job completed was removed by GitHub (ephemeral); any other is still
        // registered and would linger offline.
        let deregister = if slot.completed { None } else { slot.runner_id };
        Action::Remove { name: name.to_string(), deregister }
    }

    fn stop(&mut self, name: &str, now: Instant) -> Action {
        let slot = self.slots.get_mut(name).expect("stopping a known slot");
        slot.state = SlotState::Draining;
        slot.draining_since = Some(now);
        self.stats.stops += 1;
        Action::Stop { name: name.to_string() }
    }

    /// Idle runners beyond the waiting jobs plus `min_idle` (a job cancelled while queued, or
    /// taken by a runner started for another) are stopped, newest first. A stop is a drain:
    /// one that took a job in the meantime finishes it.
    fn shrink(&mut self, now: Instant) -> Vec<Action> {
        let idle = self.slots.values().filter(|s| s.idle()).count();
        let surplus = idle.saturating_sub(self.waiting.len() + self.min_idle);
        let mut running: Vec<(Instant, String)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.state == SlotState::Running && s.took.is_none())
            .map(|(n, s)| (s.since, n.clone()))
            .collect();
        running.sort();
        running.into_iter().rev().take(surplus).map(|(_, n)| self.stop(&n, now)).collect()
    }

    fn observe(&mut self, list: Vec<Observed>, asked: Instant, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let present: HashSet<&str> = list.iter().map(|o| o.name.as_str()).collect();
        // Gone without us: removed by hand, or by the engine.
        let vanished: Vec<String> = self
            .slots
            .iter()
            .filter(|(n, s)| s.state != SlotState::Starting && s.since < asked && !present.contains(n.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in vanished {
            let slot = self.end(&name).expect("listed above");
            if slot.state == SlotState::Removing {
                // Our removal, seen done before its `Removed` event (which then finds no slot).
                self.stats.removals += 1;
            } else if !slot.completed {
                if let Some(id) = slot.runner_id {
                    actions.push(Action::Remove { name, deregister: Some(id) });
                }
            }
        }
        for o in list {
            if self.ended.contains(&o.name) {
                // Listed before its removal finished: gone, or going.
                continue;
            }
            let stopped_before = self.stopped_before.remove(&o.name);
            let slot = self.slots.entry(o.name.clone()).or_insert_with(|| {
                // Started by an earlier run of the controller: adopted.
                self.stats.adopted += 1;
                Slot {
                    state: if stopped_before { SlotState::Draining } else { SlotState::Running },
                    for_job: o.for_job,
                    // Whether it took a job is unknown after a restart: assumed busy, so jobs
                    // waiting get runners of their own (within the maximum).
                    took: Some(o.for_job.unwrap_or(0)),
                    completed: false,
                    runner_id: o.runner_id,
                    since: now.checked_sub(o.age).unwrap_or(now),
                    draining_since: stopped_before.then_some(now),
                }
            });
            match slot.state {
                SlotState::Starting | SlotState::Removing => continue,
                SlotState::RemoveFailed => {
                    actions.push(self.remove(&o.name));
                    continue;
                }
                SlotState::Running | SlotState::Exited | SlotState::Draining => {}
            }
            let draining = slot.draining_since;
            if !o.running {
                slot.state = SlotState::Exited;
                actions.push(self.remove(&o.name));
            } else if let Some(since) = draining {
                // `docker stop`'s kill: the drain overran even its generous budget.
                if now.saturating_duration_since(since) > self.stop_grace {
                    actions.push(self.remove(&o.name));
                }
            } else if o.age > self.max_lifetime {
                // Never removed while its job runs (issue #18): stopped, the runner
                // finishes the job, de-registers and exits; an idle one exits at once.
                actions.push(self.stop(&o.name, now));
            }
        }
        actions
    }

    /// Starts containers while runners are fewer than the waiting jobs plus `min_idle`, at
    /// most `max` containers (exited ones count until they are removed).
    fn dispatch(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.paused_until.is_some_and(|t| now < t) {
            self.record();
            return actions;
        }
        self.paused_until = None;
        loop {
            let idle = self.slots.values().filter(|s| s.idle()).count();
            if self.slots.len() >= self.max || idle >= self.waiting.len() + self.min_idle {
                break;
            }
            // The oldest waiting job not yet covered by an idle runner.
            let for_job = self.waiting.get(idle).map(|(id, _)| *id);
            self.counter += 1;
            let name = format!("{}-{}", self.prefix, self.counter);
            self.slots.insert(
                name.clone(),
                Slot {
                    state: SlotState::Starting,
                    for_job,
                    took: None,
                    completed: false,
                    runner_id: None,
                    since: now,
                    draining_since: None,
                },
            );
            actions.push(Action::Start { name, for_job });
        }
        self.record();
        actions
    }

    fn record(&mut self) {
        let s = &mut self.stats;
        s.waiting = self.waiting.len();
        s.starting = self.slots.values().filter(|x| x.state == SlotState::Starting).count();
        s.idle = self.slots.values().filter(|x| x.state == SlotState::Running && x.took.is_none()).count();
        s.draining = self.slots.values().filter(|x| x.state == SlotState::Draining).count();
        s.busy = self.slots.values().filter(|x| x.state == SlotState::Running && x.took.is_some()).count();
        s.exited = self
            .slots
            .values()
            .filter(|x| matches!(x.state, SlotState::Exited | SlotState::Removing | SlotState::RemoveFailed))
            .count();
        s.containers = self.slots.len();
        s.high_water = s.high_water.max(self.slots.len());
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The ids of the jobs waiting for a runner, oldest first (kept in the state directory, so
    /// that a restart drops none of them).
    pub fn waiting(&self) -> Vec<u64> {
        self.waiting.iter().map(|(id, _)| *id).collect()
    }

    /// Whether `name` is one of this pool's runners.
    pub fn owns(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max: usize) -> Pool {
        Pool::new(max, 0, Duration::from_secs(3600), "r".into())
    }

    fn starts(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| if let Action::Start { name, .. } = a { Some(name.clone()) } else { None })
            .collect()
    }

    fn running(name: &str) -> Observed {
        Observed { name: name.into(), for_job: None, runner_id: Some(1), running: true, age: Duration::ZERO }
    }

    fn exited(name: &str) -> Observed {
        Observed { running: false, ..running(name) }
    }

    #[test]
    fn a_queued_job_starts_one_runner_and_a_redelivery_starts_none() {
        let now = Instant::now();
        let mut p = pool(3);
        let (a, actions) = p.admit(10, now);
        assert_eq!(a, Admission::Queued);
        assert_eq!(actions, [Action::Start { name: "r-1".into(), for_job: Some(10) }]);
        let (a, actions) = p.admit(10, now);
        assert_eq!((a, actions), (Admission::Duplicate, vec![]));
        // Also after the job ran: a late redelivery of `queued` starts nothing.
        p.on_event(Event::Completed { job_id: 10, runner_name: Some("r-1".into()) }, now);
        assert_eq!(p.admit(10, now).0, Admission::Duplicate);
    }

    #[test]
    fn beyond_max_jobs_wait_and_start_as_containers_are_removed() {
        let now = Instant::now();
        let mut p = pool(3);
        let mut started = Vec::new();
        for job in 1..=20 {
            started.extend(starts(&p.admit(job, now).1));
        }
        assert_eq!(started, ["r-1", "r-2", "r-3"]);
        assert_eq!(p.stats().waiting, 20);
        let mut all = started.clone();
        let mut done = 0;
        while done < 20 {
            let name = all[done].clone();
            let mut out = p.on_event(Event::Started { name: name.clone(), runner_id: done as u64 }, now);
            out.extend(p.on_event(Event::InProgress { job_id: done as u64 + 1, runner_name: Some(name.clone()) }, now));
            out.extend(p.on_event(Event::Completed { job_id: done as u64 + 1, runner_name: Some(name.clone()) }, now));
            // The container exits, is seen exited, removed; only then does capacity free.
            let seen: Vec<Observed> = p.slots.keys().map(|n| if *n == name { exited(n) } else { running(n) }).collect();
            let out2 = p.on_event(Event::Observed { list: seen, asked: now }, now);
            assert!(out2.contains(&Action::Remove { name: name.clone(), deregister: None }), "{out2:?}");
            assert!(starts(&out).is_empty() && starts(&out2).is_empty(), "started before a removal");
            let out3 = p.on_event(Event::Removed { name }, now);
            all.extend(starts(&out3));
            assert!(p.stats().containers <= 3);
            done += 1;
        }
        assert_eq!(p.stats().high_water, 3);
        assert_eq!(p.stats().waiting, 0);
        assert_eq!(p.stats().containers, 0, "runners left over: {:?}", p.slots.keys());
        assert_eq!(all.len(), 20, "one runner per job: {all:?}");
    }

    #[test]
    fn completed_removes_only_the_runner_named_in_it() {
        let now = Instant::now();
        let mut p = pool(3);
        p.admit(1, now);
        p.admit(2, now);
        for (n, id) in [("r-1", 11), ("r-2", 12)] {
            p.on_event(Event::Started { name: n.into(), runner_id: id }, now);
        }
        // r-2 took job 1 (any matching runner may), and exited.
        p.on_event(Event::Observed { list: vec![running("r-1"), exited("r-2")], asked: now }, now);
        let out = p.on_event(Event::Completed { job_id: 1, runner_name: Some("r-2".into()) }, now);
        assert!(!out.iter().any(|a| matches!(a, Action::Remove { name, .. } if name == "r-1")), "{out:?}");
        // A job done by a runner that is not ours removes nothing.
        let out = p.on_event(Event::Completed { job_id: 2, runner_name: Some("elsewhere".into()) }, now);
        assert!(!out.iter().any(|a| matches!(a, Action::Remove { .. })), "{out:?}");
    }

    #[test]
    fn a_container_that_died_before_its_job_is_removed_and_its_runner_deregistered() {
        let now = Instant::now();
        let mut p = pool(2);
        p.admit(1, now);
        p.on_event(Event::Started { name: "r-1".into(), runner_id: 42 }, now);
        let out = p.on_event(Event::Observed { list: vec![exited("r-1")], asked: now }, now);
        // The job still waits: a new runner starts for it (below max, the exited one counts).
        assert_eq!(
            out,
            [
                Action::Remove { name: "r-1".into(), deregister: Some(42) },
                Action::Start { name: "r-2".into(), for_job: Some(1) }
            ]
        );
        assert!(starts(&p.on_event(Event::Removed { name: "r-1".into() }, now)).is_empty());
    }

    #[test]
    fn containers_of_an_earlier_run_are_adopted_and_cleaned_up() {
        let now = Instant::now();
        let mut p = pool(2);
        let out = p.on_event(Event::Observed { list: vec![running("old-1"), exited("old-2")], asked: now }, now);
        assert_eq!(out, [Action::Remove { name: "old-2".into(), deregister: Some(1) }]);
        assert!(p.owns("old-1") && p.stats().adopted == 2);
        // Adopted containers count against max.
        let (_, out) = p.admit(5, now);
        assert!(starts(&out).is_empty(), "{out:?}");
        // Below max, an adopted runner (busy or not: unknown) does not stand in for a waiting job.
        let mut p = pool(3);
        p.on_event(Event::Observed { list: vec![running("old-1")], asked: now }, now);
        assert_eq!(starts(&p.admit(6, now).1).len(), 1);
    }

    #[test]
    fn waiting_jobs_restored_after_a_restart_are_admitted_again() {
        let now = Instant::now();
        let mut p = pool(1);
        for job in [3, 4, 5] {
            p.admit(job, now);
        }
        let saved = p.waiting();
        assert_eq!(saved, [3, 4, 5]);
        let mut q = pool(1);
        let starts: Vec<_> = saved.into_iter().flat_map(|j| starts(&q.admit(j, now).1)).collect();
        assert_eq!(starts.len(), 1, "max still holds: {starts:?}");
        assert_eq!(q.waiting(), [3, 4, 5]);
        assert_eq!(q.admit(4, now).0, Admission::Duplicate);
    }

    /// Issue #18: a listing asked for before a removal, applied after the `Removed` event,
    /// must never bring the container back (it took a place under the maximum, and was
    /// removed and de-registered a second time).
    #[test]
    fn a_stale_listing_after_a_removal_does_not_resurrect_the_container() {
        let t0 = Instant::now();
        let mut p = pool(1);
        p.admit(1, t0);
        p.on_event(Event::Started { name: "r-1".into(), runner_id: 7 }, t0);
        let asked = t0 + Duration::from_millis(100);
        let now = t0 + Duration::from_millis(200);
        // The container exited; the pool removes it.
        let out = p.on_event(Event::Observed { list: vec![exited("r-1")], asked }, now);
        assert_eq!(out, [Action::Remove { name: "r-1".into(), deregister: Some(7) }]);
        // A listing is asked for while the removal runs; the removal finishes first.
        let stale_asked = now + Duration::from_millis(10);
        let out = p.on_event(Event::Removed { name: "r-1".into() }, now + Duration::from_millis(20));
        assert_eq!(p.stats().containers, 1, "the job still waits, so a new runner starts: {out:?}");
        assert_eq!(starts(&out), ["r-2"]);
        // The stale listing still shows r-1: nothing is adopted, removed again, or counted.
        let later = now + Duration::from_millis(30);
        let out = p.on_event(Event::Observed { list: vec![exited("r-1")], asked: stale_asked }, later);
        assert!(out.is_empty(), "acted on an ended container: {out:?}");
        assert!(!p.owns("r-1"), "r-1 came back");
        assert_eq!((p.stats().adopted, p.stats().containers, p.stats().high_water), (0, 1, 1));
        assert_eq!(p.stats().removals, 1);
        // Also a running one (listed before an idle removal), and one whose start failed.
        let out = p.on_event(Event::Observed { list: vec![running("r-1")], asked: stale_asked }, later);
        assert!(out.is_empty() && !p.owns("r-1"), "{out:?}");
        p.on_event(Event::StartFailed { name: "r-2".into() }, later);
        let out = p.on_event(Event::Observed { list: vec![exited("r-2")], asked: later }, later);
        assert!(out.is_empty() && !p.owns("r-2"), "{out:?}");
        assert_eq!(p.stats().adopted, 0);
    }

    #[test]
    fn a_removal_seen_done_by_a_listing_before_its_event_is_counted_once() {
        let now = Instant::now();
        let mut p = pool(1);
        p.admit(1, now);
        p.on_event(Event::Started { name: "r-1".into(), runner_id: 7 }, now);
        p.on_event(Event::Observed { list: vec![exited("r-1")], asked: now }, now);
        let later = now + Duration::from_millis(10);
        let out = p.on_event(Event::Observed { list: vec![], asked: later }, later);
        assert!(!out.iter().any(|a| matches!(a, Action::Remove { .. })), "removed twice: {out:?}");
        p.on_event(Event::Removed { name: "r-1".into() }, later);
        assert_eq!(p.stats().removals, 1);
    }

    #[test]
    fn a_removal_the_engine_refused_is_asked_again_at_the_next_listing() {
        let now = Instant::now();
        let mut p = pool(1);
        p.admit(1, now);
        p.on_event(Event::Started { name: "r-1".into(), runner_id: 7 }, now);
        p.on_event(Event::Observed { list: vec![exited("r-1")], asked: now }, now);
        let out = p.on_event(Event::RemoveFailed { name: "r-1".into() }, now);
        assert!(starts(&out).is_empty(), "the container still exists and counts: {out:?}");
        let out = p.on_event(Event::Observed { list: vec![exited("r-1")], asked: now }, now);
        assert_eq!(out, [Action::Remove { name: "r-1".into(), deregister: Some(7) }]);
        assert_eq!(p.stats().adopted, 0);
    }

    /// Issue #18: a container past its lifetime while its job runs was removed by force, the
    /// job lost. It is stopped (SIGTERM once), removed only once it has exited, and killed only
    /// past a grace period longer than the supervisor's drain.
    #[test]
    fn containers_past_their_lifetime_drain_and_are_removed_only_once_exited() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(700);
        let mut p = Pool::new(2, 0, Duration::from_secs(60), "r".into()).with_stop_grace(grace);
        let old = |running| Observed { age: Duration::from_secs(61), running, ..super::tests::running("old") };
        let out = p.on_event(Event::Observed { list: vec![old(true)], asked: t0 }, t0);
        assert_eq!(out, [Action::Stop { name: "old".into() }]);
        assert_eq!((p.stats().draining, p.stats().stops), (1, 1));
        // Still running (its job goes on): no second SIGTERM, no removal, up to the grace.
        for after in [1, 300, 700] {
            let now = t0 + Duration::from_secs(after);
            let out = p.on_event(Event::Observed { list: vec![old(true)], asked: now }, now);
            assert!(out.is_empty(), "acted on a draining container after {after} s: {out:?}");
        }
        // Exited: removed (its runner de-registered itself, or GitHub did after the job).
        let now = t0 + Duration::from_secs(701);
        let mut q = Pool::new(2, 0, Duration::from_secs(60), "r".into()).with_stop_grace(grace);
        q.on_event(Event::Observed { list: vec![old(true)], asked: t0 }, t0);
        let out = q.on_event(Event::Observed { list: vec![old(false)], asked: now }, now);
        assert_eq!(out, [Action::Remove { name: "old".into(), deregister: Some(1) }]);
        // Past the grace and still running: removed by force, as `docker stop` kills.
        let out = p.on_event(Event::Observed { list: vec![old(true)], asked: now }, now);
        assert_eq!(out, [Action::Remove { name: "old".into(), deregister: Some(1) }]);
    }

    #[test]
    fn a_container_stopped_by_an_earlier_run_is_adopted_draining_and_never_stopped_twice() {
        let now = Instant::now();
        let mut p = Pool::new(2, 0, Duration::from_secs(60), "r".into()).with_stopped_before(vec!["old".into()]);
        let old = Observed { age: Duration::from_secs(61), ..running("old") };
        let out = p.on_event(Event::Observed { list: vec![old.clone()], asked: now }, now);
        assert!(out.is_empty(), "a second SIGTERM: {out:?}");
        assert_eq!((p.stats().adopted, p.stats().draining), (1, 1));
        assert_eq!(p.draining(), ["old"]);
        let out = p.on_event(Event::Observed { list: vec![Observed { running: false, ..old }], asked: now }, now);
        assert_eq!(out, [Action::Remove { name: "old".into(), deregister: Some(1) }]);
    }

    #[test]
    fn a_stop_that_failed_is_sent_again_at_the_next_listing() {
        let now = Instant::now();
        let mut p = Pool::new(2, 0, Duration::from_secs(60), "r".into());
        let old = Observed { age: Duration::from_secs(61), ..running("old") };
        p.on_event(Event::Observed { list: vec![old.clone()], asked: now }, now);
        assert!(p.on_event(Event::StopFailed { name: "old".into() }, now).is_empty());
        let out = p.on_event(Event::Observed { list: vec![old], asked: now }, now);
        assert_eq!(out, [Action::Stop { name: "old".into() }]);
    }

    #[test]
    fn the_grace_period_outlasts_the_runner_s_drain() {
        assert_eq!(stop_grace(&[]), Duration::from_secs(690));
        let env = |k: &str, v: &str| (k.to_string(), v.to_string());
        let custom = [env("DRAIN_TIMEOUT_SEC", "3300"), env("DEBUG_SHUTDOWN_DELAY_SEC", "10")];
        assert_eq!(stop_grace(&custom), Duration::from_secs(3400));
    }

    #[test]
    fn idle_runners_no_job_needs_are_stopped_never_removed_by_force() {
        let now = Instant::now();
        let mut p = Pool::new(3, 1, Duration::from_secs(3600), "r".into());
        p.on_event(Event::Tick, now);
        p.admit(1, now);
        for (n, id) in [("r-1", 1), ("r-2", 2)] {
            p.on_event(Event::Started { name: n.into(), runner_id: id }, now);
        }
        // Job 1 is cancelled while queued: one idle runner more than min_idle needs.
        let later = now + Duration::from_secs(1);
        let out = p.on_event(Event::Completed { job_id: 1, runner_name: None }, later);
        assert_eq!(out, [Action::Stop { name: "r-2".into() }], "the newest idle one drains");
        assert_eq!((p.stats().idle, p.stats().draining), (1, 1));
        let out = p.on_event(Event::Tick, later);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn failed_starts_keep_the_job_and_back_off() {
        let now = Instant::now();
        let mut p = pool(2);
        p.admit(1, now);
        let out = p.on_event(Event::StartFailed { name: "r-1".into() }, now);
        assert!(starts(&out).is_empty(), "retried at once: {out:?}");
        assert_eq!(p.stats().waiting, 1);
        let out = p.on_event(Event::Tick, now + start_backoff(1));
        assert_eq!(starts(&out), ["r-2"]);
    }

    #[test]
    fn min_idle_keeps_warm_runners_and_a_cancelled_job_needs_none() {
        let now = Instant::now();
        let mut p = Pool::new(3, 1, Duration::from_secs(3600), "r".into());
        assert_eq!(starts(&p.on_event(Event::Tick, now)), ["r-1"]);
        // A job: the warm runner will take it; one more keeps the pool warm.
        assert_eq!(starts(&p.admit(1, now).1), ["r-2"]);
        let out = p.on_event(Event::Completed { job_id: 7, runner_name: None }, now);
        assert!(starts(&out).is_empty());
        let (_, out) = p.admit(2, now);
        p.on_event(Event::Completed { job_id: 2, runner_name: None }, now);
        assert_eq!(starts(&out), ["r-3"]);
        assert_eq!(p.stats().waiting, 1);
    }
}
