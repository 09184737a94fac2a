//! Membership over real UDP: three speakers, each in a network namespace of its own,
//! joined by veths to a bridge in a fourth namespace (unique names, removed by a guard
//! even on panic). Each speaker runs on a thread that entered its namespace, in a tokio
//! runtime of its own, so its socket belongs there; "killing" one shuts that runtime
//! down without a goodbye, like kill -9.
//!
//! Needs root and `ip` (iproute2). The tests in this file run one at a time: they print
//! detection times, which other tests' load would blur. They assert behaviour, never a
//! duration: each wait polls up to a generous deadline (speed targets live in benchmarks
//! that print figures, see docs/testing.md).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferrolb_speaker::membership::{
    Config, Keyring, Members, Membership, NodeMeta, Settings, Stats,
};
use support::{Netns, unique};
use tokio::sync::{oneshot, watch};

/// Generous: joins and detections take tens to hundreds of milliseconds; CI is slow.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a member that must not be admitted is watched.
const NOT_ADMITTED_FOR: Duration = Duration::from_millis(1500);
const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];
const PORT: u16 = 7947;

/// One test at a time (see the module comment).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A bridge namespace and three node namespaces, node `i` at 10.77.0.(i+1) on `eth0`,
/// plugged into the bridge by `v{i}`.
struct Lab {
    // Dropped first: node namespaces, then the bridge.
    nodes: Vec<Netns>,
    bridge: Netns,
}

impl Lab {
    fn new() -> anyhow::Result<Self> {
        let prefix = unique("flbmem");
        let bridge = Netns::new(format!("{prefix}-br"))?;
        bridge.ip("link add br0 type bridge")?;
        bridge.ip("link set br0 up")?;
        let mut nodes = Vec::new();
        for i in 0..NAMES.len() {
            let node = Netns::new(format!("{prefix}-n{i}"))?;
            // Both ends are created inside namespaces, so the names cannot clash with
            // other tests'.
            bridge.ip(&format!(
                "link add v{i} type veth peer name eth0 netns {}",
                node.name
            ))?;
            bridge.ip(&format!("link set v{i} master br0 up"))?;
            node.ip("link set lo up")?;
            node.ip(&format!("addr add {} dev eth0", Self::cidr(i)))?;
            node.ip("link set eth0 up")?;
            nodes.push(node);
        }
        Ok(Self { nodes, bridge })
    }

    fn cidr(i: usize) -> String {
        format!("10.77.0.{}/24", i + 1)
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 77, 0, u8::try_from(i + 1).expect("few nodes")], PORT))
    }

    fn peers() -> Vec<(String, SocketAddr)> {
        (0..NAMES.len())
            .map(|i| (NAMES[i].to_owned(), Self::addr(i)))
            .collect()
    }

    fn config(i: usize, secret: Option<&[u8]>, settings: Settings) -> Config {
        Config {
            node_name: NAMES[i].to_owned(),
            bind: Self::addr(i),
            peers: Self::peers(),
            keyring: secret.map(|s| Keyring::parse(s).expect("a valid key")),
            keyring_file: None,
            settings,
            meta: NodeMeta {
                subnets: vec![Self::cidr(i).parse().expect("cidr")],
                ..NodeMeta::default()
            },
        }
    }

    /// Takes node `i`'s cable out of the switch (or puts it back).
    fn cable(&self, i: usize, plugged: bool) -> anyhow::Result<()> {
        let state = if plugged { "up" } else { "down" };
        self.bridge.ip(&format!("link set v{i} {state}"))
    }

    /// Starts a speaker's membership in node `i`'s namespace.
    fn start(&self, i: usize, secret: Option<&[u8]>) -> anyhow::Result<Speaker> {
        self.start_with(i, secret, Settings::default())
    }

    fn start_with(
        &self,
        i: usize,
        secret: Option<&[u8]>,
        settings: Settings,
    ) -> anyhow::Result<Speaker> {
        Speaker::start(&self.nodes[i].name, Self::config(i, secret, settings))
    }

    fn start_all(&self, secret: Option<&[u8]>) -> anyhow::Result<Vec<Speaker>> {
        (0..NAMES.len()).map(|i| self.start(i, secret)).collect()
    }
}

/// A membership running on a thread inside a namespace, in a runtime of its own.
struct Speaker {
    membership: Option<Membership>,
    members: watch::Receiver<Members>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Speaker {
    fn start(netns: &str, config: Config) -> anyhow::Result<Self> {
        let path = format!("/var/run/netns/{netns}");
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let result = (|| -> anyhow::Result<tokio::runtime::Runtime> {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {path}"))?;
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            })();
            let runtime = match result {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = started_tx.send(Err(error));
                    return;
                }
            };
            runtime.block_on(async move {
                let _ = started_tx.send(Membership::start(config).await);
                // Runs the membership task until told to stop (or the test is gone).
                let _ = stopped.await;
            });
            // Dropping the runtime here cancels the task and closes the socket.
        });
        let (membership, members) = started_rx
            .recv()
            .context("speaker thread died")?
            .context("starting membership")?;
        Ok(Self {
            membership: Some(membership),
            members,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn membership(&self) -> &Membership {
        self.membership.as_ref().expect("running")
    }

    fn stats(&self) -> Stats {
        self.membership().stats()
    }

    fn alive(&self) -> BTreeSet<String> {
        self.members.borrow().alive.keys().cloned().collect()
    }

    /// Graceful: announce departure, then stop.
    async fn leave(mut self) {
        if let Some(membership) = self.membership.take() {
            membership.leave().await;
        }
    }

    /// Like kill -9: the task and its socket vanish without a word.
    fn kill(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        drop(self.membership.take());
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until `speaker`'s view satisfies `done`; returns how long that took.
async fn wait_for(
    speaker: &Speaker,
    what: &str,
    done: impl FnMut(&Members) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut rx = speaker.members.clone();
    match tokio::time::timeout(DEADLINE, rx.wait_for(done)).await {
        Ok(Ok(_)) => Ok(start.elapsed()),
        Ok(Err(_)) => bail!("membership stopped before {what}"),
        Err(_) => bail!(
            "not {what} within {DEADLINE:?}; view: {:?}",
            speaker.members.borrow().alive.keys()
        ),
    }
}

/// Waits until each of `speakers` sees exactly `expected` alive.
async fn wait_alive(speakers: &[&Speaker], expected: &[&str]) -> anyhow::Result<Duration> {
    let expected = names(expected);
    let mut longest = Duration::ZERO;
    let start = Instant::now();
    for speaker in speakers {
        wait_for(speaker, &format!("seeing {expected:?}"), |m| {
            m.alive.keys().cloned().collect::<BTreeSet<_>>() == expected
        })
        .await?;
        longest = start.elapsed();
    }
    Ok(longest)
}

fn median_and_max(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test]
async fn three_members_see_each_other_and_traffic_stays_small() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    let speakers = lab.start_all(None)?;
    let refs: Vec<&Speaker> = speakers.iter().collect();
    let took = wait_alive(&refs, &NAMES).await?;
    println!("3 members formed a cluster in {}", ms(took));

    // Everyone knows everyone's subnets.
    for speaker in &speakers {
        wait_for(speaker, "seeing all metadata", |m| {
            (0..NAMES.len()).all(|i| {
                m.alive.get(NAMES[i]).map(|meta| meta.subnets.clone())
                    == Some(vec![Lab::cidr(i).parse().expect("cidr")])
            })
        })
        .await?;
    }

    // Steady-state traffic, measured over a window (not a synchronisation wait).
    let window = Duration::from_secs(2);
    let before: Vec<Stats> = speakers.iter().map(Speaker::stats).collect();
    tokio::time::sleep(window).await;
    for (i, speaker) in speakers.iter().enumerate() {
        let after = speaker.stats();
        let sent = after.sent - before[i].sent;
        let received = after.received - before[i].received;
        let pps = sent as f64 / window.as_secs_f64();
        println!(
            "{}: {pps:.0} packets/s sent, {:.0} received (defaults, 3 nodes)",
            NAMES[i],
            received as f64 / window.as_secs_f64()
        );
        // A probe and an ack per 50 ms period, plus a little gossip: far below 200.
        assert!(
            pps > 5.0 && pps < 200.0,
            "{} sends {pps} packets/s",
            NAMES[i]
        );
        assert_eq!(after.rejected, 0);
    }
    assert_eq!(speakers[0].alive(), names(&NAMES), "nobody flapped");
    Ok(())
}

#[tokio::test]
async fn a_killed_member_is_declared_down_and_a_restart_is_admitted() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    let mut speakers: Vec<Option<Speaker>> = lab.start_all(None)?.into_iter().map(Some).collect();
    let survivors_names = [NAMES[0], NAMES[1]];
    let mut detections = Vec::new();
    let mut rejoins = Vec::new();
    for round in 0..12 {
        let all: Vec<&Speaker> = speakers.iter().flatten().collect();
        wait_alive(&all, &NAMES).await?;
        // Kill at a random point of the probe cycle: a measurement detail, not a wait
        // for anything.
        let jitter = Duration::from_micros(rand_below(100_000));
        tokio::time::sleep(jitter).await;

        let victim = speakers[2].take().context("victim running")?;
        let killed_at = Instant::now();
        victim.kill();
        let survivors: Vec<&Speaker> = speakers.iter().flatten().collect();
        wait_alive(&survivors, &survivors_names).await?;
        let detected = killed_at.elapsed();
        detections.push(detected);

        // Same name, same address, new process: admitted again promptly.
        let restarted_at = Instant::now();
        speakers[2] = Some(lab.start(2, None)?);
        let all: Vec<&Speaker> = speakers.iter().flatten().collect();
        let rejoined = wait_alive(&all, &NAMES).await?;
        rejoins.push(rejoined);
        println!(
            "round {round}: kill detected by both survivors in {}, restart admitted in {}",
            ms(detected),
            ms(restarted_at.elapsed())
        );
    }
    let (median, max) = median_and_max(detections.clone());
    let (rejoin_median, rejoin_max) = median_and_max(rejoins);
    println!(
        "kill -9 detection over {} kills: median {}, max {} (default settings)",
        detections.len(),
        ms(median),
        ms(max)
    );
    println!(
        "restart admitted: median {}, max {}",
        ms(rejoin_median),
        ms(rejoin_max)
    );
    // What is asserted is that every kill was detected and every restart admitted
    // (each wait above fails past its deadline). How fast is a figure, printed here and
    // measured against the failover budget, end to end, by `benches/failover.rs`.
    Ok(())
}

#[tokio::test]
async fn a_member_that_leaves_is_dropped_without_waiting_for_detection() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    // Failure detection would take an hour to declare anyone down: a member dropped
    // before the deadline was dropped because it said it was leaving.
    let settings = Settings {
        suspect_to_down: Duration::from_secs(3600),
        ..Settings::default()
    };
    let mut speakers = (0..NAMES.len())
        .map(|i| lab.start_with(i, None, settings.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_alive(&speakers.iter().collect::<Vec<_>>(), &NAMES).await?;

    let leaving = speakers.pop().context("three speakers")?;
    let start = Instant::now();
    leaving.leave().await;
    wait_alive(&speakers.iter().collect::<Vec<_>>(), &NAMES[..2]).await?;
    println!(
        "graceful leave seen by both others in {}",
        ms(start.elapsed())
    );
    Ok(())
}

#[tokio::test]
async fn a_cut_link_is_detected_and_the_member_rejoins_when_restored() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    let speakers = lab.start_all(None)?;
    let all: Vec<&Speaker> = speakers.iter().collect();
    wait_alive(&all, &NAMES).await?;

    for round in 0..3 {
        let cut_at = Instant::now();
        lab.cable(2, false)?;
        wait_alive(&all[..2], &NAMES[..2]).await?;
        let detected = cut_at.elapsed();
        // The isolated node sees nobody else.
        wait_alive(&all[2..], &NAMES[2..]).await?;

        // Same process, cable back in: admitted again without a restart.
        let restored_at = Instant::now();
        lab.cable(2, true)?;
        wait_alive(&all, &NAMES).await?;
        println!(
            "round {round}: cut link detected by both others in {}, member back {} after \
             the link was restored",
            ms(detected),
            ms(restored_at.elapsed())
        );
    }
    for speaker in &speakers {
        wait_for(speaker, "seeing node-c's metadata again", |m| {
            m.alive.get(NAMES[2]).map(|meta| meta.subnets.clone())
                == Some(vec![Lab::cidr(2).parse().expect("cidr")])
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn members_without_the_right_secret_are_never_admitted() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    let secret: &[u8] = b"correct horse battery staple\n";
    for (label, intruder_secret) in [
        ("wrong secret", Some(&b"some other secret\n"[..])),
        ("no secret", None),
    ] {
        let a = lab.start(0, Some(secret))?;
        let b = lab.start(1, Some(secret))?;
        let c = lab.start(2, intruder_secret)?;
        wait_alive(&[&a, &b], &NAMES[..2]).await?;

        // Watched for a while: neither side ever admits the other.
        let until = Instant::now() + NOT_ADMITTED_FOR;
        let mut rx = [a.members.clone(), b.members.clone(), c.members.clone()];
        while Instant::now() < until {
            for (view, expected) in rx.iter().zip([&NAMES[..2], &NAMES[..2], &NAMES[2..]]) {
                let seen: BTreeSet<String> = view.borrow().alive.keys().cloned().collect();
                assert_eq!(
                    seen,
                    names(expected),
                    "{label}: someone admitted an intruder"
                );
            }
            // Woken by any change; the deadline only ends the observation.
            let [ra, rb, rc] = &mut rx;
            let _ = tokio::time::timeout(until.saturating_duration_since(Instant::now()), async {
                tokio::select! {
                    _ = ra.changed() => {}
                    _ = rb.changed() => {}
                    _ = rc.changed() => {}
                }
            })
            .await;
        }
        // The intruder did knock, and was turned away on both sides.
        assert!(
            a.stats().rejected + b.stats().rejected > 0,
            "{label}: A and B saw nothing"
        );
        assert!(c.stats().rejected > 0, "{label}: the intruder saw nothing");
        println!(
            "{label}: rejected datagrams A {}, B {}, intruder {}",
            a.stats().rejected,
            b.stats().rejected,
            c.stats().rejected
        );
        drop((a, b, c));
    }
    Ok(())
}

#[tokio::test]
async fn new_metadata_reaches_the_others() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let lab = Lab::new()?;
    let speakers = lab.start_all(Some(b"a shared key"))?;
    let all: Vec<&Speaker> = speakers.iter().collect();
    wait_alive(&all, &NAMES).await?;

    let meta = NodeMeta {
        subnets: vec![
            "10.77.0.0/24".parse()?,
            "192.0.2.0/24".parse()?,
            "2001:db8::/64".parse()?,
        ],
        settled: true,
        started_at_ms: 1,
        reported: true,
        proxy_failing: true,
    };
    let start = Instant::now();
    speakers[0].membership().set_meta(meta.clone())?;
    for speaker in &speakers {
        wait_for(speaker, "seeing node-a's new metadata", |m| {
            m.alive.get(NAMES[0]) == Some(&meta)
        })
        .await?;
    }
    println!("new metadata seen by all in {}", ms(start.elapsed()));
    Ok(())
}

/// A random number below `n` without a dependency: good enough to pick a phase.
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) % n
}
