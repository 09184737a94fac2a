//! How fast the speaker answers ARP, next to the Linux kernel answering for its own
//! address in the same lab and the same run, plus the speaker's resident memory
//! (issue 3, Benchmark).
//!
//! A one-node lab: node0's kernel owns 192.0.2.10, the real `ferrolb speaker` binary on
//! node0 owns a VIP. From the client, on an AF_PACKET socket:
//! * latency: one ARP request outstanding at a time, timed until its reply arrives,
//!   kernel and speaker requests interleaved so both see the same machine load;
//! * sustained replies/s: a window of requests kept in flight for a fixed time;
//! * memory: VmRSS/VmHWM of the speaker with 1 VIP, then restarted with 100.
//! * foreign flood: with 100 VIPs, the client sends [`FLOOD_RATE`] ARP requests per
//!   second for addresses the speaker does not own (issue 21, item 10) for
//!   [`FLOOD_TIME`]; the speaker's CPU time over that span is printed. Run only this
//!   part with `cargo bench --bench l2_answers -- --flood-only`.
//!
//! Both round trips include the same client-side cost (a syscall each way and a tokio
//! wake-up), so the ratio understates the speaker's own extra time; the difference of
//! the medians is printed too. Prints figures and asserts nothing. Runs only under
//! `cargo bench` (which passes `--bench`); `cargo test --benches` and `--list` return at
//! once. Needs root and iproute2.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb::lab::{Host, Lab, LabProcess};
use ferrolb_speaker::arp::{self, Operation};
use ferrolb_speaker::packet_socket::{ETH_P_ARP, PacketSocket, arp_filter};

/// Round trips per target before measuring (caches, page faults, CPU frequency).
const WARMUP: usize = 500;
/// Timed round trips per target.
const SAMPLES: usize = 5_000;
/// A request with no reply by then counts as lost.
const REPLY_TIMEOUT: Duration = Duration::from_millis(100);
/// Requests kept in flight in the sustained test: enough to keep the answerer busy,
/// far below what a default socket receive buffer holds, so nothing is dropped there.
const WINDOW: usize = 32;
/// No reply for this long in the sustained test: the window is assumed lost, refilled.
const STALL: Duration = Duration::from_millis(5);
/// Sustained test: rounds per target (alternating kernel and speaker) and their length.
const ROUNDS: u32 = 2;
const ROUND: Duration = Duration::from_secs(1);
/// Quiet time that ends a drain of late replies.
const DRAIN_QUIET: Duration = Duration::from_millis(20);
/// How long a speaker may take to answer for all its VIPs after it starts.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// The VIPs: a pool well clear of the lab's hosts (.10 to .99 and .100).
const POOL_FIRST: u8 = 130;
const POOL_LAST: u8 = 249;
const MANY_VIPS: usize = 100;
/// Foreign ARP requests per second in the flood, and for how long.
const FLOOD_RATE: u64 = 70_000;
const FLOOD_TIME: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    if flag("--list") {
        return ExitCode::SUCCESS;
    }
    if !flag("--bench") || flag("--test") {
        // `cargo test --benches` passes no `--bench`: a lab run is no quick check.
        eprintln!("l2_answers: skipped (it runs under `cargo bench`, which passes --bench)");
        return ExitCode::SUCCESS;
    }
    match run(flag("--flood-only")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l2_answers: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flood_only: bool) -> Result<()> {
    let lab = Lab::new(1)?;
    let node = lab.node(0);
    let client = lab.client();
    let kernel_ip = node.ipv4();
    let vips: Vec<Ipv4Addr> = (0..MANY_VIPS)
        .map(|i| Ipv4Addr::new(192, 0, 2, POOL_FIRST + i as u8))
        .collect();
    let vip = vips[0];

    let dir = tempfile::tempdir().context("creating the manifest directory")?;
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("nodes.yaml", &lab.node_manifests())?;
    write("pool.yaml", &pool())?;
    write("services.yaml", &services(&vips[..1]))?;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_ferrolb"));
    let asker = Asker {
        client,
        ifindex: link_index(client)?,
        mac: client.mac(),
        ip: client.ipv4(),
        node_mac: node.mac(),
    };

    eprintln!("l2_answers: lab {} ready, starting the speaker", lab.id());
    if flood_only {
        write("services.yaml", &services(&vips))?;
        let mut speaker = start_speaker(node, &binary, dir.path(), &asker, &vips, &[])?;
        let flood = client.in_netns(|| asker.flood(speaker.pid()))??;
        stop(&mut speaker);
        flood.print();
        return lab.close();
    }
    let mut speaker = start_speaker(node, &binary, dir.path(), &asker, &[vip], &[])?;
    let speaker_pid = speaker.pid();
    let one_idle = Memory::of(speaker_pid)?;
    let in_kernel = client.in_netns(|| asker.measure(kernel_ip, vip, speaker_pid))??;
    let one_loaded = Memory::of(speaker_pid)?;
    stop(&mut speaker);
    let mut speaker = start_speaker(
        node,
        &binary,
        dir.path(),
        &asker,
        &[vip],
        &["--arp-in-kernel=false"],
    )?;
    let speaker_pid = speaker.pid();
    let in_user_space = client.in_netns(|| asker.measure(kernel_ip, vip, speaker_pid))??;
    stop(&mut speaker);

    write("services.yaml", &services(&vips))?;
    let mut speaker = start_speaker(node, &binary, dir.path(), &asker, &vips, &[])?;
    let many_idle = Memory::of(speaker.pid())?;
    let flood = client.in_netns(|| asker.flood(speaker.pid()))??;
    stop(&mut speaker);

    in_kernel.print(kernel_ip, vip, "its kernel responder (the default)");
    in_user_space.print(kernel_ip, vip, "user space (--arp-in-kernel=false)");
    println!(
        "Speaker memory       1 VIP: {one_idle} idle, {one_loaded} after the load above | \
         {MANY_VIPS} VIPs: {many_idle} (target VmRSS < 15 MiB with {MANY_VIPS}: {})",
        met(many_idle.rss_kib < 15 * 1024)
    );
    flood.print();
    lab.close()
}

/// Starts the speaker on `node` and waits until the client gets an answer for every one
/// of `vips`.
fn start_speaker(
    node: &Host,
    binary: &Path,
    manifests: &Path,
    asker: &Asker,
    vips: &[Ipv4Addr],
    args: &[&str],
) -> Result<LabProcess> {
    let mut speaker = node.spawn_speaker(binary, manifests, args)?;
    if let Err(e) = asker
        .client
        .in_netns(|| asker.wait_answered(vips))
        .and_then(|answered| answered)
    {
        let exited = speaker.try_wait().ok().flatten();
        bail!(
            "{e:#}\nspeaker exit status: {exited:?}\nspeaker stderr:\n{}",
            speaker.stderr().unwrap_or_default()
        );
    }
    Ok(speaker)
}

/// SIGTERM, as a service manager would; dropping the handle kills what lingers.
fn stop(speaker: &mut LabProcess) {
    if let Err(e) = speaker
        .terminate()
        .and_then(|()| speaker.wait_timeout(Duration::from_secs(5)))
    {
        eprintln!("l2_answers: stopping the speaker: {e:#}");
    }
}

fn pool() -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: bench}}\n\
         spec:\n  addresses: [192.0.2.{POOL_FIRST}-192.0.2.{POOL_LAST}]\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: bench}}\nspec: {{}}\n"
    )
}

/// One IPv4 LoadBalancer Service per VIP, each asking for its IP by annotation so the
/// bench knows what to ask for without running the allocator itself.
fn services(vips: &[Ipv4Addr]) -> String {
    vips.iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc{i}\n  namespace: default\n  \
                 annotations: {{ferrolb.io/loadBalancerIPs: \"{ip}\"}}\nspec:\n  type: LoadBalancer\n  \
                 ports:\n  - {{port: 80, nodePort: {}, protocol: TCP}}\n",
                30000 + i
            )
        })
        .collect()
}

/// The client's eth0 index, read inside its namespace (sysfs there shows its links).
fn link_index(host: &Host) -> Result<u32> {
    let out = host.run("cat", [format!("/sys/class/net/{}/ifindex", host.ifname())])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("{}: ifindex {text:?} is not a number", host.name()))
}

/// The client's side: who it is on the wire, and the requests it sends. Its methods
/// that open sockets must run inside the client's namespace ([`Host::in_netns`]).
struct Asker<'a> {
    client: &'a Host,
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
    /// node0's MAC: its kernel and its speaker both answer with it.
    node_mac: [u8; 6],
}

impl Asker<'_> {
    /// A broadcast "who has `target`? tell <client>": an ordinary request, as a host
    /// resolving a neighbour sends, not a probe (sender 0.0.0.0), so the kernel takes
    /// its usual path (it also refreshes its entry for the client).
    fn request(&self, target: Ipv4Addr) -> Result<Vec<u8>> {
        /// The sender protocol address: Ethernet header (14) + htype, ptype, hlen, plen,
        /// oper (8) + sender hardware address (6).
        const SENDER_IP: std::ops::Range<usize> = 28..32;
        let mut frame = arp::probe(self.mac, target);
        frame[SENDER_IP].copy_from_slice(&self.ip.octets());
        match arp::parse(&frame) {
            Ok(p)
                if p.operation == Operation::Request
                    && p.sender_ip == self.ip
                    && p.target_ip == target =>
            {
                Ok(frame)
            }
            other => bail!("building an ARP request for {target} gave {other:?}"),
        }
    }

    /// Whether `frame` is node0's reply to our request for `target`.
    fn is_reply(&self, frame: &[u8], target: Ipv4Addr) -> bool {
        arp::parse(frame).is_ok_and(|p| {
            p.operation == Operation::Reply
                && p.sender_ip == target
                && p.sender_mac == self.node_mac
                && p.target_ip == self.ip
                && p.target_mac == self.mac
        })
    }

    fn socket(&self) -> Result<PacketSocket> {
        PacketSocket::open(self.ifindex, ETH_P_ARP, &arp_filter())
            .context("opening an AF_PACKET socket on the client")
    }

    /// Asks for every VIP not yet answered, in rounds, until all are (a speaker answers
    /// only after probing, RFC 5227).
    fn wait_answered(&self, vips: &[Ipv4Addr]) -> Result<()> {
        let requests: Vec<Vec<u8>> = vips
            .iter()
            .map(|ip| self.request(*ip))
            .collect::<Result<_>>()?;
        block_on(async {
            let socket = self.socket()?;
            let mut pending: Vec<bool> = vec![true; vips.len()];
            let mut buf = vec![0u8; 2048];
            let deadline = Instant::now() + START_DEADLINE;
            while pending.iter().any(|p| *p) {
                if Instant::now() >= deadline {
                    let left: Vec<String> = vips
                        .iter()
                        .zip(&pending)
                        .filter(|(_, p)| **p)
                        .map(|(ip, _)| ip.to_string())
                        .collect();
                    bail!(
                        "no ARP reply within {START_DEADLINE:?} for {} VIPs: {}",
                        left.len(),
                        left.join(", ")
                    );
                }
                for (request, _) in requests.iter().zip(&pending).filter(|(_, p)| **p) {
                    socket
                        .send(request)
                        .await
                        .context("sending an ARP request")?;
                }
                let round_end = tokio::time::Instant::now() + Duration::from_millis(30);
                while let Ok(received) =
                    tokio::time::timeout_at(round_end, socket.recv(&mut buf)).await
                {
                    let n = received.context("receiving ARP")?;
                    if let Some(i) = vips.iter().position(|v| self.is_reply(&buf[..n], *v)) {
                        pending[i] = false;
                    }
                }
            }
            Ok(())
        })?
    }

    /// Latency and sustained rate for the kernel's address and the VIP of the speaker
    /// running as `speaker_pid`, both on node0.
    fn measure(&self, kernel: Ipv4Addr, vip: Ipv4Addr, speaker_pid: u32) -> Result<Measured> {
        let kernel_request = self.request(kernel)?;
        let vip_request = self.request(vip)?;
        block_on(async {
            let socket = self.socket()?;
            let mut buf = vec![0u8; 2048];
            let targets = [(kernel, &kernel_request), (vip, &vip_request)];
            let mut samples = [Samples::default(), Samples::default()];
            for i in 0..WARMUP + SAMPLES {
                for (t, (ip, request)) in targets.iter().enumerate() {
                    let rtt = self.round_trip(&socket, request, *ip, &mut buf).await?;
                    if i >= WARMUP {
                        samples[t].add(rtt);
                    }
                    if rtt.is_none() {
                        drain(&socket, &mut buf).await?;
                    }
                }
            }
            let mut rates = [Rate::default(), Rate::default()];
            for _ in 0..ROUNDS {
                for (t, (ip, request)) in targets.iter().enumerate() {
                    let r = self
                        .sustained(&socket, request, *ip, speaker_pid, &mut buf)
                        .await?;
                    rates[t].add(r);
                    drain(&socket, &mut buf).await?;
                }
            }
            let [kernel_latency, speaker_latency] = samples;
            let [kernel_rate, speaker_rate] = rates;
            Ok(Measured {
                kernel_latency,
                speaker_latency,
                kernel_rate,
                speaker_rate,
            })
        })?
    }

    /// One request, timed until its reply; `None` if none came in [`REPLY_TIMEOUT`].
    async fn round_trip(
        &self,
        socket: &PacketSocket,
        request: &[u8],
        target: Ipv4Addr,
        buf: &mut [u8],
    ) -> Result<Option<Duration>> {
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + REPLY_TIMEOUT);
        socket
            .send(request)
            .await
            .context("sending an ARP request")?;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(buf)).await {
            let n = received.context("receiving ARP")?;
            if self.is_reply(&buf[..n], target) {
                return Ok(Some(start.elapsed()));
            }
        }
        Ok(None)
    }

    /// Sends [`FLOOD_RATE`] requests per second for [`FLOOD_TIME`], for addresses nobody
    /// in the lab owns and from senders that are not lab hosts (a scan, a broadcast
    /// storm), and notes the speaker's CPU time meanwhile.
    fn flood(&self, speaker_pid: u32) -> Result<Flood> {
        /// Sender protocol address, as in [`Asker::request`].
        const SENDER_IP: std::ops::Range<usize> = 28..32;
        let frames: Vec<Vec<u8>> = (0..1024u32)
            .map(|i| {
                let target = Ipv4Addr::from(0x0a09_0000 | i);
                let mut frame = arp::probe(self.mac, target);
                frame[SENDER_IP].copy_from_slice(&Ipv4Addr::from(0x0a08_0000 | i).octets());
                frame
            })
            .collect();
        block_on(async {
            let socket = self.socket()?;
            let speaker_dir = format!("/proc/{speaker_pid}");
            let before = cpu_time(&speaker_dir);
            let start = Instant::now();
            let mut sent: u64 = 0;
            while start.elapsed() < FLOOD_TIME {
                // Catch up to the rate in 1 ms steps.
                let due = (start.elapsed().as_secs_f64() * FLOOD_RATE as f64) as u64;
                while sent < due {
                    socket
                        .send(&frames[(sent % frames.len() as u64) as usize])
                        .await
                        .context("sending a foreign ARP request")?;
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = start.elapsed();
            let speaker_cpu = cpu_time(&speaker_dir)
                .zip(before)
                .map(|(after, before)| after.saturating_sub(before));
            Ok(Flood {
                sent,
                elapsed,
                speaker_cpu,
            })
        })?
    }

    /// Keeps [`WINDOW`] requests in flight for [`ROUND`], sending one more per reply.
    /// Also notes how busy this thread and the speaker were, to tell who set the pace.
    async fn sustained(
        &self,
        socket: &PacketSocket,
        request: &[u8],
        target: Ipv4Addr,
        speaker_pid: u32,
        buf: &mut [u8],
    ) -> Result<Rate> {
        let start = Instant::now();
        let client_cpu = cpu_time("/proc/thread-self");
        let speaker_dir = format!("/proc/{speaker_pid}");
        let speaker_cpu = cpu_time(&speaker_dir);
        let end = start + ROUND;
        let mut rate = Rate::default();
        let mut in_flight = 0;
        let mut now = start;
        while now < end {
            while in_flight < WINDOW {
                socket
                    .send(request)
                    .await
                    .context("sending an ARP request")?;
                in_flight += 1;
                rate.sent += 1;
            }
            match tokio::time::timeout(STALL, socket.recv(buf)).await {
                Ok(received) => {
                    let n = received.context("receiving ARP")?;
                    if self.is_reply(&buf[..n], target) {
                        in_flight -= 1;
                        rate.replies += 1;
                    }
                }
                // Nothing for a while: what was in flight is lost, start a new window.
                Err(_) => {
                    in_flight = 0;
                    rate.stalls += 1;
                }
            }
            now = Instant::now();
        }
        rate.elapsed = now - start;
        let spent = |dir: &str, before: Option<Duration>| {
            cpu_time(dir)
                .zip(before)
                .map(|(after, before)| after.saturating_sub(before))
        };
        rate.client_cpu = spent("/proc/thread-self", client_cpu);
        rate.speaker_cpu = spent(&speaker_dir, speaker_cpu);
        Ok(rate)
    }
}

/// Reads and discards frames until none has come for [`DRAIN_QUIET`] (late replies of
/// a lost request or a finished window), so they are not taken for the next one's.
async fn drain(socket: &PacketSocket, buf: &mut [u8]) -> Result<()> {
    let give_up = Instant::now() + Duration::from_secs(1);
    while Instant::now() < give_up {
        match tokio::time::timeout(DRAIN_QUIET, socket.recv(buf)).await {
            Ok(received) => drop(received.context("receiving ARP")?),
            Err(_) => break,
        }
    }
    Ok(())
}

/// CPU time so far of the thread whose /proc directory is `dir` (its `schedstat`), or
/// of every thread of the process whose directory it is (summed over `task/*/`):
/// nanoseconds, unlike the ticks of `stat`. Unless the kernel is built with
/// CONFIG_IRQ_TIME_ACCOUNTING, this includes softirq work done on the thread's behalf,
/// such as the kernel answering ARP at the far end of a veth within the client's own
/// `send()`. None if the kernel does not say.
fn cpu_time(dir: &str) -> Option<Duration> {
    let one = |path: PathBuf| -> Option<Duration> {
        let text = std::fs::read_to_string(path).ok()?;
        Some(Duration::from_nanos(
            text.split_whitespace().next()?.parse().ok()?,
        ))
    };
    let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) else {
        return one(Path::new(dir).join("schedstat"));
    };
    let mut total = Duration::ZERO;
    for task in tasks {
        total += one(task.ok()?.path().join("schedstat"))?;
    }
    Some(total)
}

/// Runs `f` on a current-thread runtime on this thread (the one inside the namespace).
fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")?;
    Ok(runtime.block_on(f))
}

/// Round-trip times of one target, and how many requests got no reply.
#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    lost: usize,
}

impl Samples {
    fn add(&mut self, rtt: Option<Duration>) {
        match rtt {
            Some(t) => self.times.push(t),
            None => self.lost += 1,
        }
    }

    /// The `q` quantile (nearest rank), or zero without samples.
    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.times.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "median {} p99 {} max {} ({} samples, {} lost)",
            micros(self.quantile(0.5)),
            micros(self.quantile(0.99)),
            micros(self.quantile(1.0)),
            self.times.len(),
            self.lost
        )
    }
}

/// Outcome of sustained rounds against one target, summed.
struct Rate {
    sent: u64,
    replies: u64,
    stalls: u64,
    elapsed: Duration,
    /// Time the client's thread and the speaker's threads were on a CPU (None: not
    /// known on this kernel).
    client_cpu: Option<Duration>,
    speaker_cpu: Option<Duration>,
}

impl Default for Rate {
    fn default() -> Rate {
        Rate {
            sent: 0,
            replies: 0,
            stalls: 0,
            elapsed: Duration::ZERO,
            client_cpu: Some(Duration::ZERO),
            speaker_cpu: Some(Duration::ZERO),
        }
    }
}

impl Rate {
    fn add(&mut self, other: Rate) {
        self.sent += other.sent;
        self.replies += other.replies;
        self.stalls += other.stalls;
        self.elapsed += other.elapsed;
        let sum = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| a + b);
        self.client_cpu = sum(self.client_cpu, other.client_cpu);
        self.speaker_cpu = sum(self.speaker_cpu, other.speaker_cpu);
    }

    fn per_second(&self) -> f64 {
        self.replies as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn summary(&self) -> String {
        let busy = |cpu: Option<Duration>| match cpu {
            Some(cpu) => format!(
                "{:.0}%",
                100.0 * cpu.as_secs_f64() / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
            ),
            None => "n/a".to_string(),
        };
        format!(
            "{:.0}/s ({} replies to {} requests in {:.2} s, {} stalls; on CPU: client thread {}, \
             speaker {})",
            self.per_second(),
            self.replies,
            self.sent,
            self.elapsed.as_secs_f64(),
            self.stalls,
            busy(self.client_cpu),
            busy(self.speaker_cpu)
        )
    }
}

/// What the speaker spent while foreign ARP requests flooded its link.
struct Flood {
    sent: u64,
    elapsed: Duration,
    speaker_cpu: Option<Duration>,
}

impl Flood {
    fn print(&self) {
        let cpu = match self.speaker_cpu {
            Some(cpu) => format!(
                "{:.1}% of one CPU ({} ms)",
                100.0 * cpu.as_secs_f64() / self.elapsed.as_secs_f64(),
                cpu.as_millis()
            ),
            None => "n/a".to_string(),
        };
        println!(
            "Foreign ARP flood    {:.0} requests/s for addresses nobody owns, {:.1} s, \
             {MANY_VIPS} VIPs owned: speaker on CPU {cpu}",
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.elapsed.as_secs_f64()
        );
    }
}

struct Measured {
    kernel_latency: Samples,
    speaker_latency: Samples,
    kernel_rate: Rate,
    speaker_rate: Rate,
}

impl Measured {
    fn print(&self, kernel: Ipv4Addr, vip: Ipv4Addr, how: &str) {
        let (km, sm) = (
            self.kernel_latency.quantile(0.5),
            self.speaker_latency.quantile(0.5),
        );
        let sp99 = self.speaker_latency.quantile(0.99);
        let ratio = sm.as_secs_f64() / km.as_secs_f64().max(f64::MIN_POSITIVE);
        println!();
        println!(
            "ferrolb speaker answering from {how} vs Linux kernel: ARP answers from node0 \
             to the lab client (veth + bridge), requests interleaved, one outstanding at a time"
        );
        println!(
            "ARP reply latency    kernel  ({kernel}): {}",
            self.kernel_latency.summary()
        );
        println!(
            "                     speaker ({vip}): {}",
            self.speaker_latency.summary()
        );
        println!(
            "                     median ratio speaker/kernel {ratio:.2}x (target <= 1.5x: {}), \
             speaker adds {} at the median; speaker p99 {} (target < 100 us: {})",
            met(ratio <= 1.5),
            micros(sm.saturating_sub(km)),
            micros(sp99),
            met(sp99 < Duration::from_micros(100))
        );
        let rate_ratio =
            self.speaker_rate.per_second() / self.kernel_rate.per_second().max(f64::MIN_POSITIVE);
        println!(
            "Sustained replies/s  kernel:  {}",
            self.kernel_rate.summary()
        );
        println!(
            "                     speaker: {}",
            self.speaker_rate.summary()
        );
        println!(
            "                     ratio speaker/kernel {rate_ratio:.2}x \
             ({WINDOW} requests in flight, {ROUNDS} x {} s per target, alternating)",
            ROUND.as_secs_f64()
        );
        println!(
            "                     (the client thread's CPU includes the kernel's answers, made \
             in its own send() on veth, unless IRQ time is accounted apart; near 100% the \
             client, not the answerer, set the pace)"
        );
    }
}

/// Resident memory of a process, from /proc/PID/status.
#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    /// Of the speaker: `ip netns exec` execs the program in place, so the spawned pid
    /// is the speaker itself; its name is checked to be sure.
    fn of(pid: u32) -> Result<Memory> {
        let comm_path = format!("/proc/{pid}/comm");
        let comm =
            std::fs::read_to_string(&comm_path).with_context(|| format!("reading {comm_path}"))?;
        if comm.trim() != "ferrolb" {
            bail!(
                "process {pid} is {:?}, not the speaker (ferrolb)",
                comm.trim()
            );
        }
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path)
            .with_context(|| format!("reading {status_path}"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {name} in {status_path}"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB (VmHWM {:.1} MiB)",
            self.rss_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0
        )
    }
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
