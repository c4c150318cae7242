//! `connections`: open `--streams` idle WebSockets (one per agent), hold them
//! `--duration-s`, and report the opening time and the server's RSS (`VmRSS`
//! of `--server-pid`) before and after opening.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, timeout};

use crate::tally::{header, row};
use crate::{Bench, DRAIN};

pub async fn run(b: Arc<Bench>) -> Result<(), String> {
    let (n, hold) = (b.targets, b.args.duration_s);
    b.register(n).await?;
    let before = rss_kib(b.args.server_pid);
    let (stop, stop_rx) = watch::channel(false);
    let (streams, open_secs) = b.open_streams(n, &stop_rx).await;
    let opened = b.st.open_streams.load(Relaxed);
    let after = rss_kib(b.args.server_pid);
    eprintln!("holding {opened} streams for {hold} s");
    sleep(Duration::from_secs(hold)).await;
    let held = b.st.open_streams.load(Relaxed);
    let _ = stop.send(true);
    let _ = timeout(DRAIN, streams.join_all()).await;
    header();
    row("connect", &b.st.connect, open_secs);
    println!(
        "streams: {opened} of {n} opened in {open_secs:.2} s, {held} still open after {hold} s"
    );
    match (b.args.server_pid, before, after) {
        (None, ..) => println!("server RSS: pass --server-pid"),
        (Some(pid), Some(before), Some(after)) => {
            let (mib_before, mib_after) = (before as f64 / 1024.0, after as f64 / 1024.0);
            let kib_each = (after as f64 - before as f64) / opened.max(1) as f64;
            print!("server RSS (pid {pid}): {mib_before:.1} MiB before, {mib_after:.1} MiB after");
            println!(" opening, {kib_each:.2} KiB per open stream");
        }
        (Some(pid), ..) => println!("server RSS: cannot read VmRSS in /proc/{pid}/status"),
    }
    Ok(())
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}
