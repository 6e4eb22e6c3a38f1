//! `livemig bench transport`: the transports alone, without a VM. Frames the size of a
//! 64-page run of incompressible data go from a sender to a receiver over loopback on
//! `channels` connections, framed as the migration's senders frame them (a CRC under a
//! session key on plain TCP, an HMAC with a pre-shared key, TLS records with TLS), and the
//! receiver checks every frame. Throughput and CPU time per GiB, against plain TCP in the
//! same run. This is the transport's own cost, which a migration on this machine hides
//! behind the destination's first touch of its guest memory (`docs/transport.md`).

use crate::bench::fmt_ratio;
use anyhow::{anyhow, bail, Result};
use migration::frame::{FrameReader, FrameWriter, Kind};
use migration::transport::psk::Dir;
use migration::transport::{self, Conn};
use migration::Security;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A 64-page run with its 16-byte head, as the senders make them.
const FRAME: usize = 64 * 4096 + 16;
const TIMEOUT: Duration = Duration::from_secs(10);
const SESSION: u64 = 0x1234_5678_9abc_def1;

/// Sends `frames` frames on one connection.
fn send(conn: Conn, sec: &Security, channel: u16, frames: u64, data: &[u8]) -> Result<()> {
    let tls = conn.authenticated();
    let mut w = FrameWriter::new(conn).with_key(SESSION);
    w.set_mac(
        sec.psk()
            .map(|p| p.session(b"bench", b"bench").key(Dir::ToDest, channel)),
    );
    if tls {
        w.trust_transport();
    }
    for _ in 0..frames {
        w.send(Kind::Pages, data)?;
    }
    w.flush()?;
    let conn = w.get_mut();
    conn.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver's end, so TLS's close is not cut short.
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(conn, &mut b);
    Ok(())
}

/// Reads and checks frames until the end; how many payload bytes came.
fn receive(conn: Conn, sec: &Security, channel: u16) -> Result<u64> {
    let mut r = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, conn.try_clone()?)).with_key(SESSION);
    r.set_mac(
        sec.psk()
            .map(|p| p.session(b"bench", b"bench").key(Dir::ToDest, channel)),
    );
    if conn.authenticated() {
        r.trust_transport();
    }
    let mut n = 0u64;
    while let Some(f) = r.read_frame()? {
        n += f.payload.len() as u64;
    }
    conn.shutdown(std::net::Shutdown::Both)?;
    Ok(n)
}

/// One transfer of `bytes` over `channels` connections: wall and CPU time.
fn transfer(name: &str, dir: &std::path::Path, channels: u16, bytes: u64) -> Result<(Duration, Duration)> {
    let (src, dst) = crate::bench_migration::security(name, dir)?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let frames = (bytes / FRAME as u64 / channels as u64).max(1);
    let mut data = vec![0u8; FRAME];
    SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15).fill_bytes(&mut data);
    let data = Arc::new(data);
    let rx = std::thread::spawn(move || -> Result<u64> {
        let mut hs = Vec::new();
        for c in 0..channels {
            let (tcp, _) = l.accept()?;
            let conn = transport::server(tcp, &dst, TIMEOUT).map_err(|e| anyhow!(e))?;
            let d = dst.clone();
            hs.push(std::thread::spawn(move || receive(conn, &d, c)));
        }
        let mut n = 0;
        for h in hs {
            n += h.join().map_err(|_| anyhow!("a receiver panicked"))??;
        }
        Ok(n)
    });
    // Connections and handshakes first: the clock measures the data.
    let mut conns = Vec::new();
    for _ in 0..channels {
        let tcp = TcpStream::connect(&addr)?;
        conns.push(transport::client(tcp, "localhost", &src, TIMEOUT).map_err(|e| anyhow!(e))?);
    }
    let (t, c0) = (Instant::now(), crate::bench_migration::cpu_now());
    let senders: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let (s, d) = (src.clone(), data.clone());
            std::thread::spawn(move || send(conn, &s, c as u16, frames, &d))
        })
        .collect();
    for s in senders {
        s.join().map_err(|_| anyhow!("a sender panicked"))??;
    }
    let got = rx.join().map_err(|_| anyhow!("the receiver panicked"))??;
    let (wall, cpu) = (t.elapsed(), crate::bench_migration::cpu_now() - c0);
    let want = frames * channels as u64 * FRAME as u64;
    if got != want {
        bail!("{name}: {got} payload bytes arrived of {want}");
    }
    Ok((wall, cpu))
}

pub fn run(transports: &[String], channels: &[u16], gib: f64, runs: usize) -> Result<()> {
    if !(gib > 0.0 && gib <= 64.0) {
        bail!("--gib must be more than 0 and at most 64");
    }
    if runs == 0 || channels.iter().any(|&c| c == 0 || c > 64) {
        bail!("--runs must be at least 1 and --channels between 1 and 64");
    }
    let dir = std::env::temp_dir().join(format!("livemig-bench-transport-{}", std::process::id()));
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _c = Cleanup(dir.clone());
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    // Each run's (GiB/s, CPU s per GiB).
    type Runs = Vec<(f64, f64)>;
    let mut results: Vec<(String, u16, Runs)> = Vec::new();
    for run in 0..runs {
        for &ch in channels {
            for t in transports {
                tracing::info!("transport {t}, {ch} connection(s), run {} ...", run + 1);
                let (wall, cpu) = transfer(t, &dir, ch, bytes)?;
                let g = bytes as f64 / (1u64 << 30) as f64;
                let r = (g / wall.as_secs_f64(), cpu.as_secs_f64() / g);
                match results.iter_mut().find(|(n, c, _)| n == t && *c == ch) {
                    Some((_, _, v)) => v.push(r),
                    None => results.push((t.clone(), ch, vec![r])),
                }
            }
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{gib} GiB of incompressible 64-page runs per transfer over loopback, every frame checked by the receiver; \
         {runs} run(s), interleaved, medians. CPU: this process's CPU time (both ends) per GiB.\n"
    );
    println!("| transport | connections | throughput | ÷ tcp | CPU per GiB | ÷ tcp |");
    println!("|---|---|---|---|---|---|");
    let rows: Vec<(String, u16, f64, f64)> = results
        .into_iter()
        .map(|(t, c, v)| {
            let tp = med(v.iter().map(|x| x.0).collect());
            let cpu = med(v.iter().map(|x| x.1).collect());
            (t, c, tp, cpu)
        })
        .collect();
    for (t, c, tp, cpu) in &rows {
        let base = rows.iter().find(|(bt, bc, _, _)| bt == "tcp" && bc == c);
        let ratio = |x: f64, b: Option<f64>| b.map_or("–".into(), |b| fmt_ratio(x / b));
        println!(
            "| {t} | {c} | {:.2} GiB/s | {} | {cpu:.2} s | {} |",
            tp,
            ratio(*tp, base.map(|b| b.2)),
            ratio(*cpu, base.map(|b| b.3)),
        );
    }
    Ok(())
}
