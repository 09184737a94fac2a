//! The user's side: HTTP requests, kept-open connections and ARP from the client's
//! network namespace (the suite itself runs on this machine).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb::lab::{Netns, Origin, measure_tcp_outage, parse_mac};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long an ARP request waits for its answers while polling: the responders on one
/// segment answer within milliseconds.
pub const ARP_POLL: Duration = Duration::from_millis(200);

/// What a backend answered: which Pod, on which node, and the client address it saw.
#[derive(Debug, Clone)]
pub struct Answer {
    pub pod: String,
    pub client: String,
    /// The client's own address on this connection, as it sent it.
    pub local: SocketAddr,
}

/// One HTTP GET of `path` on `ip:port` from the client.
pub fn get(from: &Netns, ip: IpAddr, port: u16, path: &str) -> Result<(String, SocketAddr)> {
    let target = SocketAddr::new(ip, port);
    let stream = from
        .in_netns(|| TcpStream::connect_timeout(&target, TIMEOUT))?
        .with_context(|| format!("connecting to {target} from {}", from.name()))?;
    let local = stream.local_addr()?;
    let mut conn = Kept::new(stream, target);
    conn.get(path).map(|body| (body, local))
}

/// GET / of the backend at `ip:80`: which Pod answered and what it saw.
pub fn ask(from: &Netns, ip: IpAddr) -> Result<Answer> {
    let (body, local) = get(from, ip, 80, "/")?;
    // "pod=NAME node=NODE client=ADDR"
    let field = |k: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
            .with_context(|| format!("unexpected answer from {ip}: {body:?}"))
    };
    Ok(Answer {
        pod: field("pod=")?,
        client: field("client=")?,
        local,
    })
}

/// Polls GET / of `ip` until it answers: how long that took.
pub fn wait_answer(from: &Netns, ip: IpAddr, deadline: Duration) -> Result<(Answer, Duration)> {
    let start = Instant::now();
    loop {
        match ask(from, ip) {
            Ok(a) => return Ok((a, start.elapsed())),
            Err(e) if start.elapsed() > deadline => {
                return Err(e.context(format!(
                    "{ip} did not answer within {} s",
                    deadline.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// An HTTP/1.1 connection kept open across requests (keep-alive).
pub struct Kept {
    reader: BufReader<TcpStream>,
    target: SocketAddr,
}

impl Kept {
    pub fn open(from: &Netns, ip: IpAddr, port: u16) -> Result<Kept> {
        let target = SocketAddr::new(ip, port);
        let stream = from
            .in_netns(|| TcpStream::connect_timeout(&target, TIMEOUT))?
            .with_context(|| format!("connecting to {target}"))?;
        Ok(Kept::new(stream, target))
    }

    fn new(stream: TcpStream, target: SocketAddr) -> Kept {
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        Kept {
            reader: BufReader::new(stream),
            target,
        }
    }

    /// One request on this connection; the body of a 200 answer.
    pub fn get(&mut self, path: &str) -> Result<String> {
        let host = self.target;
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
        )?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("{host}{path} answered {:?}", status.trim());
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("{host} closed the connection mid-answer");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let length = length.context("an answer without Content-Length")?;
        // Bodies are a line of text: refuse anything else rather than buffer it.
        if length > 64 * 1024 {
            bail!("{host} answered with {length} bytes");
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The MACs that answer one ARP request for `ip` from the client within `wait` (arping
/// waits that long whatever comes back, to see every responder).
pub fn arping(from: &Netns, ip: IpAddr, wait: Duration) -> Result<Vec<[u8; 6]>> {
    let route = in_client(from, "ip", &["-o", "route", "get", &ip.to_string()])?;
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .with_context(|| format!("no route from {} to {ip}: {route}", from.name()))?
        .to_string();
    let wait = format!("{:.3}", wait.as_secs_f64());
    let out = in_client(
        from,
        "arping",
        &["-c", "1", "-w", &wait, "-i", &dev, &ip.to_string()],
    )
    .unwrap_or_default();
    Ok(out
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(" bytes from ")?.1;
            let (mac, rest) = rest.split_once(' ')?;
            rest.starts_with(&format!("({ip})"))
                .then(|| parse_mac(mac))?
        })
        .collect())
}

/// `program ARGS` in the client's network namespace; its stdout (an error when it fails).
pub fn in_client(from: &Netns, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = match from.path() {
        Some(path) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", path.display())).arg(program);
            c
        }
        None => Command::new(program),
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The outage the client sees on `ip:80` while `disrupt` runs (see
/// [`ferrolb::lab::measure_tcp_outage`]), and then the share of connections that still
/// fail over the next `after` (backends behind a node that is gone, until Kubernetes
/// notices).
pub fn outage(
    from: &Netns,
    ip: IpAddr,
    disrupt: impl FnOnce() -> Result<()>,
) -> Result<(Duration, (u32, u32))> {
    let target = SocketAddr::new(ip, 80);
    let outage = measure_tcp_outage(from, target, disrupt, Duration::from_secs(90))?;
    let after = Duration::from_secs(3);
    let residual = from.in_netns(|| {
        let (mut failed, mut all) = (0, 0);
        let start = Instant::now();
        while start.elapsed() < after {
            all += 1;
            if TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_err() {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (failed, all)
    })?;
    Ok((outage.duration, residual))
}

/// What [`probe_until`] saw.
pub struct Gaps {
    pub probes: u32,
    pub failed: u32,
    pub longest: Duration,
}

/// New connections to `vip:80` every 20 ms from the client, on a thread of their own,
/// until `done` is set: how many failed, and the longest time between a success and the
/// next.
pub fn probe_until(
    from: &Netns,
    vip: IpAddr,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<Gaps>> {
    let from = from.clone();
    std::thread::spawn(move || from.in_netns(|| probe(vip, &done)))
}

fn probe(vip: IpAddr, done: &AtomicBool) -> Gaps {
    let target = SocketAddr::new(vip, 80);
    let mut gaps = Gaps {
        probes: 0,
        failed: 0,
        longest: Duration::ZERO,
    };
    let mut last_ok = Instant::now();
    while !done.load(Ordering::Relaxed) {
        let began = Instant::now();
        gaps.probes += 1;
        if TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok() {
            gaps.longest = gaps.longest.max(began.duration_since(last_ok));
            last_ok = Instant::now();
        } else {
            gaps.failed += 1;
        }
        if let Some(rest) = Duration::from_millis(20).checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    gaps
}
