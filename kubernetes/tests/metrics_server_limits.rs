//! The metrics server listens on every node's host network, so any Pod can reach it: a
//! crowd of idle connections and a client that sends its headers a byte at a time must
//! neither lock out a scrape nor grow the process towards its memory limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Room for the test's own client sockets besides the server's.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

async fn scrape(server: SocketAddr) -> (String, Duration) {
    let start = Instant::now();
    let exchange = async {
        let mut s = TcpStream::connect(server).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("no answer to a scrape within 10 s")
        .expect("scraping");
    (answer, start.elapsed())
}

/// Opens a connection from `source` (any 127/8 address works on loopback) and leaves a
/// request half sent.
async fn idle_connection(source: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut s = socket.connect(server).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nX-Waiting: ")
        .await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_slow_header_client_neither_lock_out_a_scrape_nor_grow_memory() {
    raise_open_files_limit();
    let body = "# TYPE ferrolb_example gauge\nferrolb_example 1\n".repeat(200);
    let render: ferrolb_kubernetes::http::Render = Arc::new(move || body.clone());
    let server = ferrolb_kubernetes::http::serve(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        render,
        Arc::new(|| Ok(())),
    )
    .await
    .expect("serving");
    let (first, _) = scrape(server).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let before = rss_kib();

    // 5,000 idle connections from 50 addresses (as many Pods would), 100 each.
    let mut idle = Vec::with_capacity(5_000);
    for n in 0..5_000u32 {
        let source = IpAddr::from([127, 0, 1, 2 + (n % 50) as u8]);
        match idle_connection(source, server).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("idle connection {n} from {source}: {e}"),
        }
    }

    // Then a byte of header every 200 ms: never a whole request.
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(server)
            .await
            .expect("slow client connects");
        let started = Instant::now();
        for b in b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).await.is_err() || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        started.elapsed()
    });

    let (answer, took) = scrape(server).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "scrape answered {answer:?}"
    );
    assert!(answer.contains("ferrolb_example 1"), "{answer}");
    println!("scrape with 5,000 idle connections open: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "a scrape took {took:?} while 5,000 idle connections were open"
    );
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    println!("RSS grew {grown_mib} MiB with 5,000 idle connections");
    assert!(
        grown_mib < 32,
        "RSS grew {grown_mib} MiB with 5,000 idle connections (limit: +32 MiB)"
    );

    // The slow client is cut off by the header timeout, not served for ever.
    let held = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the slow-header client is still connected after 20 s")
        .expect("slow client task");
    println!("slow-header client disconnected after {held:?}");
    drop(idle);
}
