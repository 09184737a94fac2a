//! Measuring how long a client's traffic is cut while something goes wrong, the figure a
//! user of a floating IP cares about: the lab command, the failover tests and the
//! benchmarks all measure it the same way.
//!
//! The client starts a TCP connection to the target every [`PROBE_INTERVAL`], each from
//! a fresh source port (so no connection's state carries over) and each given
//! [`PROBE_TIMEOUT`] to complete, without waiting for the earlier ones. Each probe
//! counts at the instant it started, and the outage runs from the start of the last
//! probe that succeeded before the first one that failed to the start of the first one
//! that succeeded after it: its resolution is [`PROBE_INTERVAL`]. (Until issue 24 a
//! probe waited for the one before it, so one that met a dead path held the next back
//! for its whole timeout and outages came in steps of [`PROBE_TIMEOUT`].)

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};

use super::{Host, Origin};

/// How long one probe waits for its connection. Far below TCP's first SYN retransmission
/// (1 s), so a probe measures the path as it is now, never a retry.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(50);
/// Probes start at most this often: fine enough resolution, and few enough connections
/// that a long measurement never runs out of source ports (TIME_WAIT lasts 60 s).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Consecutive successes that make probing steady, before the disruption starts.
const STEADY_SUCCESSES: u32 = 3;
/// Consecutive successes after the disruption returned, with no failure at all, that
/// mean it cut nothing (outage zero).
const SETTLE_SUCCESSES: u32 = 10;
/// How often a [`TcpBackend`] checks for new connections and for being dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// How long a client's traffic was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// From the last success before the first failure to the first success after it;
    /// zero when no probe failed.
    pub duration: Duration,
    /// Probes that failed, counted from the start of the disruption.
    pub failed_probes: u32,
    /// Probes sent from the start of the disruption until the measurement ended.
    pub probes: u32,
}

/// The error [`measure_tcp_outage`] returns when traffic never came back: callers that
/// expect that possibility (the lab command) find it with `downcast_ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficLost {
    pub client: String,
    pub target: SocketAddr,
    /// How long after the disruption started probing gave up (the `give_up` asked for).
    pub after: Duration,
    pub failed_probes: u32,
    pub probes: u32,
}

impl std::fmt::Display for TrafficLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "traffic from {} to {} did not come back within {} ({} of {} probes failed)",
            self.client,
            self.target,
            format_duration(self.after),
            self.failed_probes,
            self.probes
        )
    }
}

impl std::error::Error for TrafficLost {}

/// Probes `target` from `client` with TCP connects (see the [module docs](self)) until
/// probing is steady (a few successes in a row), runs `disrupt`, and returns the outage:
/// from the last success before the first failure to the first success after it. When no
/// probe fails between the start of `disrupt` and a few successes after it returned, the
/// outage is zero: `disrupt` must have taken effect by the time it returns.
///
/// Gives up `give_up` after the disruption started with a [`TrafficLost`] error, or, when
/// the client cannot reach `target` steadily within `give_up` to begin with, with an
/// error saying so. An error from `disrupt` stops probing and is returned.
pub fn measure_tcp_outage(
    client: &impl Origin,
    target: SocketAddr,
    disrupt: impl FnOnce() -> Result<()>,
    give_up: Duration,
) -> Result<Outage> {
    measure_tcp_outage_unless(client, target, disrupt, give_up, || false)
}

/// [`measure_tcp_outage`] that also stops, with an error, as soon as `stop` returns true
/// (checked before every probe): how an interactive caller honours Ctrl-C at once.
pub fn measure_tcp_outage_unless(
    client: &impl Origin,
    target: SocketAddr,
    disrupt: impl FnOnce() -> Result<()>,
    give_up: Duration,
    stop: impl Fn() -> bool + Sync,
) -> Result<Outage> {
    let control = Control {
        phase: AtomicU8::new(Phase::Before as u8),
        cancel: AtomicBool::new(false),
    };
    let (steady_tx, steady_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            client
                .in_netns(|| probe(client.name(), target, &control, &stop, steady_tx, give_up))
                .and_then(|r| r)
        });
        let join = |prober: std::thread::ScopedJoinHandle<'_, Result<Outage>>| {
            prober
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the probing thread panicked")))
        };
        // A closed channel means the prober ended without becoming steady: its error says why.
        if steady_rx.recv().is_err() {
            return join(prober);
        }
        control.set(Phase::During);
        // Should `disrupt` panic, the scope waits for the prober: stop it at once.
        let _stop_on_unwind = StopOnDrop(&control.cancel);
        let disrupted = disrupt();
        control.set(Phase::After);
        if let Err(e) = disrupted {
            control.cancel.store(true, Ordering::Relaxed);
            let _ = join(prober);
            return Err(e.context("disrupting the traffic to measure"));
        }
        join(prober)
    })
}

/// Sets its flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Where the measurement is, shared by the caller (which disrupts) and the prober.
struct Control {
    phase: AtomicU8,
    cancel: AtomicBool,
}

impl Control {
    fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Before,
            1 => Phase::During,
            _ => Phase::After,
        }
    }
}

/// One connection attempt under way.
struct Attempt {
    socket: Socket,
    began: Instant,
    phase: Phase,
    /// Known once the connection is made, refused, or has timed out.
    ok: Option<bool>,
}

/// The probing loop, on a thread inside the client's namespace. A probe starts every
/// [`PROBE_INTERVAL`] whether or not the earlier ones have finished (at most
/// [`PROBE_TIMEOUT`] ÷ [`PROBE_INTERVAL`] + 1 are in flight), and each is judged by when
/// it started: the outage is known to within one interval, not within one timeout, as
/// it was when a probe that met a dead path held up the next for its whole timeout.
fn probe(
    client: &str,
    target: SocketAddr,
    control: &Control,
    stop: &(impl Fn() -> bool + Sync),
    steady: mpsc::Sender<()>,
    give_up: Duration,
) -> Result<Outage> {
    let mut tracker = Tracker::new(STEADY_SUCCESSES, SETTLE_SUCCESSES);
    let mut steady = Some(steady);
    let started = Instant::now();
    let mut disruption_started: Option<Instant> = None;
    let mut last_error: Option<std::io::Error> = None;
    let mut flying: VecDeque<Attempt> = VecDeque::new();
    let mut next_start = started;
    loop {
        if control.cancel.load(Ordering::Relaxed) || stop() {
            bail!("probing {target} from {client} was stopped");
        }
        let now = Instant::now();
        match disruption_started {
            None if steady.is_some() && now - started >= give_up => {
                let why = last_error.map_or_else(String::new, |e| format!(": {e}"));
                bail!(
                    "{client} cannot reach {target} steadily within {}{why}",
                    format_duration(give_up)
                );
            }
            Some(at) if now - at >= give_up => {
                let (failed_probes, probes) = tracker.counts();
                return Err(TrafficLost {
                    client: client.to_string(),
                    target,
                    after: give_up,
                    failed_probes,
                    probes,
                }
                .into());
            }
            _ => {}
        }
        if now >= next_start {
            let phase = control.phase();
            if phase != Phase::Before && disruption_started.is_none() {
                disruption_started = Some(now);
            }
            let (socket, outcome) = start_connect(target)?;
            let ok = match outcome {
                Ok(known) => known,
                Err(e) => {
                    last_error = Some(e);
                    Some(false)
                }
            };
            flying.push_back(Attempt {
                socket,
                began: now,
                phase,
                ok,
            });
            next_start = now + PROBE_INTERVAL;
        }
        wait_for_attempts(&mut flying, next_start, &mut last_error)?;
        while flying.front().is_some_and(|a| a.ok.is_some()) {
            let Some(attempt) = flying.pop_front() else {
                break;
            };
            let ok = attempt.ok == Some(true);
            match tracker.record(attempt.phase, ok, attempt.began) {
                Progress::Steady => {
                    // The caller may already be gone (it returns only after joining us).
                    if let Some(tx) = steady.take() {
                        let _ = tx.send(());
                    }
                }
                Progress::Done(outage) => return Ok(outage),
                Progress::Probing => {}
            }
        }
    }
}

/// A non-blocking connection attempt to `target`: its socket, and its outcome when
/// already known (`Ok(Some(true))` made at once, `Err` refused at once).
fn start_connect(target: SocketAddr) -> Result<(Socket, std::io::Result<Option<bool>>)> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)
        .context("opening a probe socket")?;
    socket
        .set_nonblocking(true)
        .context("making a probe socket non-blocking")?;
    let outcome = match socket.connect(&target.into()) {
        Ok(()) => Ok(Some(true)),
        Err(e)
            if e.raw_os_error() == Some(libc::EINPROGRESS)
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    };
    Ok((socket, outcome))
}

/// Waits until an attempt in flight finishes, one times out, or `until`, and records
/// each attempt's outcome.
fn wait_for_attempts(
    flying: &mut VecDeque<Attempt>,
    until: Instant,
    last_error: &mut Option<std::io::Error>,
) -> Result<()> {
    // An attempt still unanswered at its timeout has failed.
    for attempt in flying.iter_mut() {
        if attempt.ok.is_none() && attempt.began.elapsed() >= PROBE_TIMEOUT {
            attempt.ok = Some(false);
            *last_error = Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {}", format_duration(PROBE_TIMEOUT)),
            ));
        }
    }
    let pending: Vec<usize> = (0..flying.len())
        .filter(|&i| flying[i].ok.is_none())
        .collect();
    let deadline = pending
        .iter()
        .map(|&i| flying[i].began + PROBE_TIMEOUT)
        .chain(std::iter::once(until))
        .min()
        .unwrap_or(until);
    let wait = deadline.saturating_duration_since(Instant::now());
    let mut fds: Vec<libc::pollfd> = pending
        .iter()
        .map(|&i| libc::pollfd {
            fd: flying[i].socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    let millis = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of pollfd of the length given, alive for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow::Error::from(e).context("waiting for probe connections"));
        }
        return Ok(());
    }
    for (fd, &i) in fds.iter().zip(&pending) {
        if fd.revents == 0 {
            continue;
        }
        let attempt = &mut flying[i];
        match attempt.socket.take_error() {
            Ok(None) => attempt.ok = Some(true),
            Ok(Some(e)) | Err(e) => {
                attempt.ok = Some(false);
                *last_error = Some(e);
            }
        }
    }
    Ok(())
}

/// Where a probe fell relative to the disruption (as the probe started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Before = 0,
    During = 1,
    After = 2,
}

/// What a [`Tracker`] concluded from the probes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Probing,
    /// Enough successes in a row before the disruption: it may start.
    Steady,
    Done(Outage),
}

/// The outage arithmetic, apart from sockets and clocks: probe results go in, in the
/// order the probes started, each with the instant it started.
#[derive(Debug)]
struct Tracker {
    steady_needed: u32,
    settle_needed: u32,
    in_a_row: u32,
    last_success: Option<Instant>,
    /// The last success before the first failure since the disruption started.
    before_failure: Option<Instant>,
    failed_since: bool,
    settled: u32,
    failed_probes: u32,
    probes: u32,
}

impl Tracker {
    fn new(steady_needed: u32, settle_needed: u32) -> Tracker {
        Tracker {
            steady_needed,
            settle_needed,
            in_a_row: 0,
            last_success: None,
            before_failure: None,
            failed_since: false,
            settled: 0,
            failed_probes: 0,
            probes: 0,
        }
    }

    fn record(&mut self, phase: Phase, ok: bool, at: Instant) -> Progress {
        if phase == Phase::Before {
            // Failures before the disruption only delay steadiness.
            self.in_a_row = if ok { self.in_a_row + 1 } else { 0 };
            if ok {
                self.last_success = Some(at);
            }
            return if self.in_a_row >= self.steady_needed {
                Progress::Steady
            } else {
                Progress::Probing
            };
        }
        self.probes += 1;
        if !ok {
            self.failed_probes += 1;
            if !self.failed_since {
                self.failed_since = true;
                self.before_failure = self.last_success;
            }
            return Progress::Probing;
        }
        if self.failed_since {
            // Steadiness came before the disruption, so there was a success before.
            let from = self.before_failure.unwrap_or(at);
            return Progress::Done(self.outage(at.saturating_duration_since(from)));
        }
        self.last_success = Some(at);
        if phase == Phase::After {
            self.settled += 1;
            if self.settled >= self.settle_needed {
                return Progress::Done(self.outage(Duration::ZERO));
            }
        }
        Progress::Probing
    }

    fn outage(&self, duration: Duration) -> Outage {
        Outage {
            duration,
            failed_probes: self.failed_probes,
            probes: self.probes,
        }
    }

    /// `(failed, all)` probes since the disruption started.
    fn counts(&self) -> (u32, u32) {
        (self.failed_probes, self.probes)
    }
}

/// `212 ms` and `5 s` below ten seconds, `12.3 s` above: how the lab prints durations.
pub fn format_duration(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else if d >= Duration::from_secs(1) && d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A TCP listener inside a lab host that accepts and closes every connection: the
/// smallest backend a connect probe needs. It stops listening when dropped, so new
/// connections to it are refused from then on.
#[derive(Debug)]
pub struct TcpBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far: proof of which backend served a client.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Host {
    /// Listens on `addr` inside this host (an address of the host, or a wildcard), and
    /// accepts and closes every connection until the returned handle is dropped.
    pub fn serve_tcp(&self, addr: SocketAddr) -> Result<TcpBackend> {
        let listener = self
            .in_netns(|| TcpListener::bind(addr))?
            .with_context(|| format!("{}: listening on {addr}", self.name()))?;
        // Non-blocking, so that dropping the handle stops the thread whatever state the
        // namespace is in by then (a blocked accept() could only be woken from inside it).
        listener
            .set_nonblocking(true)
            .with_context(|| format!("{}: listening on {addr}", self.name()))?;
        let addr = listener.local_addr().unwrap_or(addr);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("{}-tcp-{}", self.name(), addr.port()))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                accepted.fetch_add(1, Ordering::SeqCst);
                                drop(conn);
                            }
                            // The kernel completes handshakes on its own; accept() only
                            // empties the queue, so checking every few ms loses nothing.
                            Err(_) => std::thread::sleep(ACCEPT_POLL),
                        }
                    }
                })
                .with_context(|| format!("{}: starting the backend thread", self.name()))?
        };
        Ok(TcpBackend {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    #[test]
    fn steady_needs_successes_in_a_row_before_the_disruption() {
        let t = Instant::now();
        let mut tr = Tracker::new(3, 10);
        assert_eq!(tr.record(Phase::Before, true, ms(t, 0)), Progress::Probing);
        assert_eq!(tr.record(Phase::Before, true, ms(t, 10)), Progress::Probing);
        assert_eq!(
            tr.record(Phase::Before, false, ms(t, 20)),
            Progress::Probing
        );
        assert_eq!(tr.record(Phase::Before, true, ms(t, 30)), Progress::Probing);
        assert_eq!(tr.record(Phase::Before, true, ms(t, 40)), Progress::Probing);
        assert_eq!(tr.record(Phase::Before, true, ms(t, 50)), Progress::Steady);
        assert_eq!(tr.counts(), (0, 0), "nothing before the disruption counts");
    }

    #[test]
    fn the_outage_runs_from_the_last_success_to_the_first_success_after_failures() {
        let t = Instant::now();
        let mut tr = Tracker::new(1, 10);
        assert_eq!(tr.record(Phase::Before, true, ms(t, 0)), Progress::Steady);
        assert_eq!(tr.record(Phase::During, true, ms(t, 10)), Progress::Probing);
        assert_eq!(
            tr.record(Phase::During, false, ms(t, 70)),
            Progress::Probing
        );
        assert_eq!(
            tr.record(Phase::After, false, ms(t, 130)),
            Progress::Probing
        );
        assert_eq!(
            tr.record(Phase::After, true, ms(t, 222)),
            Progress::Done(Outage {
                duration: Duration::from_millis(212),
                failed_probes: 2,
                probes: 4,
            })
        );
    }

    #[test]
    fn a_failure_right_after_steadiness_measures_from_the_steady_success() {
        let t = Instant::now();
        let mut tr = Tracker::new(2, 10);
        tr.record(Phase::Before, true, ms(t, 0));
        assert_eq!(tr.record(Phase::Before, true, ms(t, 10)), Progress::Steady);
        tr.record(Phase::During, false, ms(t, 60));
        assert_eq!(
            tr.record(Phase::After, true, ms(t, 100)),
            Progress::Done(Outage {
                duration: Duration::from_millis(90),
                failed_probes: 1,
                probes: 2,
            })
        );
    }

    #[test]
    fn no_failure_settles_to_a_zero_outage_only_after_the_disruption_returned() {
        let t = Instant::now();
        let mut tr = Tracker::new(1, 3);
        tr.record(Phase::Before, true, ms(t, 0));
        for i in 1..=20 {
            assert_eq!(
                tr.record(Phase::During, true, ms(t, i * 10)),
                Progress::Probing
            );
        }
        tr.record(Phase::After, true, ms(t, 300));
        tr.record(Phase::After, true, ms(t, 310));
        assert_eq!(
            tr.record(Phase::After, true, ms(t, 320)),
            Progress::Done(Outage {
                duration: Duration::ZERO,
                failed_probes: 0,
                probes: 23,
            })
        );
    }

    #[test]
    fn failures_keep_counting_until_traffic_returns() {
        let t = Instant::now();
        let mut tr = Tracker::new(1, 1);
        tr.record(Phase::Before, true, ms(t, 0));
        for i in 1..=50 {
            assert_eq!(
                tr.record(Phase::After, false, ms(t, i * 50)),
                Progress::Probing
            );
        }
        assert_eq!(tr.counts(), (50, 50));
    }

    #[test]
    fn durations_read_as_a_person_would_write_them() {
        assert_eq!(format_duration(Duration::from_micros(212_900)), "212 ms");
        assert_eq!(format_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(format_duration(Duration::from_millis(3_250)), "3250 ms");
        assert_eq!(format_duration(Duration::from_millis(12_345)), "12.3 s");
    }
}
