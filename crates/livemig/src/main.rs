//! The `livemig` command line.

/// `println!` that ignores a closed stdout: a VM process must not die because whoever
/// started it stopped reading.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// The same for stderr.
macro_rules! eout {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod bench;
mod bench_control;
mod bench_migration;
mod bench_net;
mod bench_sweep;
mod bench_transport;
mod bench_viommu;
mod children;
mod ctlsock;
mod demo;
mod faults_cmd;
mod iommu_demo;
mod logging;
mod receive;
mod run;
mod soak;
mod summary;
mod sweep_charts;
mod vmopts;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use iommu::FormatKind;
use livemig::{control, security};
use std::path::PathBuf;
use vmopts::VmOpts;

#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about = "Live migration of a KVM VM with a DMA device behind an emulated IOMMU",
    after_help = "Logging:
  Progress, events and warnings are logged to stderr; stdout carries only a command's output
  (the `listening on` line, summaries, tables, --json). --log-format json writes one JSON object
  per line (timestamp, level, target, message and the event's fields). RUST_LOG sets the levels
  (e.g. RUST_LOG=warn, RUST_LOG=migration=debug); without it livemig's own crates log at info and
  the libraries it uses at warn. Child processes (demo, soak, bench) log in the same format."
)]
struct Cli {
    /// How log events are written to stderr: text (human-readable lines) or json (one JSON
    /// object per line). Levels come from RUST_LOG (default: info for livemig's crates).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to migrate (the `migrate` command's arguments on the control socket).
#[derive(Args, Clone, Debug)]
struct MigFlags {
    /// Device-write tracking: iommu (HWPT dirty bits), device-log (the device's DMA log) or
    /// none (every DMA-mapped page is dirty at every sync).
    #[arg(long, default_value = "iommu", value_parser = ["iommu", "device-log", "none"])]
    mode: String,
    /// Parallel page connections besides the control connection (0: pages on the control
    /// connection; at most 64).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    channels: u16,
    /// Downtime limit in milliseconds (QEMU's downtime-limit).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    downtime_limit: u64,
    /// Switch over after this many iterations even if not converged.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    max_iterations: u32,
    /// Throttle the vCPUs while the dirty rate outruns the bandwidth.
    #[arg(long)]
    auto_converge: bool,
    /// Send pages uncompressed (zero pages are still sent as zero runs).
    #[arg(long)]
    no_compress: bool,
    /// How the destination proves it holds the source's guest (memory, device and vCPU
    /// state): gate (compared before the guest resumes there; a mismatch rolls back, at the
    /// cost of hashing the source's memory inside the downtime), audit (the guest resumes at
    /// once and is compared after; a mismatch fails loudly and the source holds the original)
    /// or off.
    #[arg(long, default_value = "gate", value_parser = ["gate", "audit", "off"])]
    verify: String,
    /// The same as --verify off.
    #[arg(long, conflicts_with = "verify")]
    no_verify: bool,
    /// Cap the migration at this many MiB/s on the wire (0: unlimited; otherwise at least 1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_mib_rate)]
    max_bandwidth_mib: f64,
    /// Seconds without progress from the destination (no reply, or a write that does not
    /// move) before the source gives up on it.
    #[arg(long, default_value_t = 10.0, value_parser = parse_timeout)]
    peer_timeout: f64,
}

impl MigFlags {
    fn args(&self, uri: String) -> control::MigrateArgs {
        control::MigrateArgs {
            uri,
            mode: self.mode.clone(),
            channels: self.channels,
            downtime_limit: self.downtime_limit,
            max_iterations: self.max_iterations,
            auto_converge: self.auto_converge,
            compress: !self.no_compress,
            verify: control::VerifyArg::Mode(if self.no_verify {
                "off".into()
            } else {
                self.verify.clone()
            }),
            max_bandwidth: (self.max_bandwidth_mib * 1048576.0) as u64,
            peer_timeout: (self.peer_timeout * 1000.0) as u64,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Live-migrate a running guest (dirtier + busy accelerator behind the IOMMU) from a
    /// source VM process to a destination process on loopback, and print a summary.
    Demo {
        #[command(flatten)]
        vm: VmOpts,
        #[command(flatten)]
        mig: MigFlags,
        /// How long the guest runs before the migration starts, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        warmup_ms: u64,
        /// Print the final state as one JSON object (QEMU query-migrate field names).
        #[arg(long)]
        json: bool,
        /// Migrate over mutually authenticated TLS with a throwaway CA and certificates
        /// generated for this run (in a temporary directory, removed afterwards).
        #[arg(long, conflicts_with = "psk_file")]
        tls: bool,
        /// Authenticate every frame with the pre-shared key in this file (at least 32 hex
        /// digits, mode 0600), on both sides.
        #[arg(long)]
        psk_file: Option<PathBuf>,
    },
    /// Start a VM running its guest programs, controlled through a unix socket (JSON lines:
    /// query-status, migrate, query-migrate, migrate-cancel, cont, quit, release). After a migration
    /// hands the guest over, the process keeps it paused (postmigrate) until `quit`, or until
    /// --release-after.
    Run {
        #[command(flatten)]
        vm: VmOpts,
        /// The control socket's path. An existing file there is never removed unless it is a
        /// socket nobody listens on; a path another VM listens on is refused.
        #[arg(long, default_value = "/tmp/livemig.sock")]
        control: PathBuf,
        /// After a confirmed handover, release the paused guest and exit this many seconds
        /// later (default: keep it until `quit`). A handover the destination never confirmed
        /// is always kept.
        #[arg(long, value_parser = parse_timeout)]
        release_after: Option<f64>,
        /// Start without a VM and wait for one to migrate in on HOST:PORT (QEMU's -incoming;
        /// port 0 picks a free one, printed on the first line). The VM options are then the
        /// source's. A guest handed over from here is released with `release` (or
        /// --release-after), and the process waits on the same address for the next one.
        #[arg(long)]
        incoming: Option<String>,
        /// With --incoming: seconds without progress from a source before giving up on it.
        #[arg(long, default_value_t = 10.0, value_parser = parse_timeout, requires = "incoming")]
        peer_timeout: f64,
        /// With --incoming: the transport incoming migrations must use.
        #[command(flatten)]
        sec: security::SecFlags,
        /// Test-only: leak a descriptor, a thread or memory on every guest received (the
        /// soak's bounds must catch it).
        #[arg(long, hide = true, requires = "incoming")]
        sabotage_leak: Option<run::Leak>,
    },
    /// Ask a `livemig run` process to migrate its VM, follow it and print the summary.
    #[command(after_help = "Exit status:
  0  completed: the destination runs the guest (verified, unless --verify off); the source holds
     its paused copy until `quit`
  2  failed and rolled back: the source runs the guest (also after migrate-cancel)
  3  failed after the source committed: the source holds the guest paused and resumable; check
     the destination, then `quit` the source or `cont` it (query-status says which)
  1  anything else (bad arguments, no control socket, ...)")]
    Migrate {
        /// The control socket of the `livemig run` process.
        #[arg(long, default_value = "/tmp/livemig.sock")]
        control: PathBuf,
        /// Destination HOST:PORT (a `livemig receive`).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        mig: MigFlags,
        #[command(flatten)]
        sec: security::SecFlags,
        /// Print the final state as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Wait for one incoming VM on HOST:PORT and run it.
    Receive {
        /// HOST:PORT to listen on (port 0 picks a free one, printed on the first line).
        #[arg(long)]
        listen: String,
        /// Present a different accelerator identity (dev_id) than the source's: the device
        /// refuses the migration during pre-copy.
        #[arg(long, value_parser = parse_u32)]
        accel_dev_id: Option<u32>,
        /// Exit this long after the guest resumed here (default: run until killed).
        #[arg(long)]
        exit_after_ms: Option<u64>,
        /// Seconds without progress from the source (no bytes, or a write that does not move)
        /// before this side gives up; without the source's commit the VM is discarded.
        #[arg(long, default_value_t = 10.0, value_parser = parse_timeout)]
        peer_timeout: f64,
        #[command(flatten)]
        sec: security::SecFlags,
        /// Test-only: resume without waiting for the source's commit (breaks the protocol on
        /// purpose; the fault matrix must then report split brains).
        #[arg(long, hide = true)]
        sabotage_resume_before_commit: bool,
    },
    /// The emulated IOMMU alone: map a guest-sized space in every format, DMA from device
    /// threads with dirty tracking on, harvest, and compare what was found with what was written.
    IommuDemo {
        /// Guest-sized IOVA space to map, in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Device threads per format.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// DMA writes per thread.
        #[arg(long, default_value_t = 20_000)]
        writes: u64,
    },
    /// The switchover fault matrix: migrations through a fault-injecting proxy that cuts,
    /// stalls, kills or freezes the destination, flips, truncates, duplicates, drops,
    /// reorders or garbles at each protocol step, in each direction; checks that the guest
    /// never runs twice, is never lost, and that nothing hangs or panics. Prints the table.
    Faults(faults_cmd::Args),
    /// One guest migrated back and forth between two long-lived `run --incoming` processes,
    /// A → B → A → …, each migration verified, with both processes' RSS, open descriptors and
    /// threads sampled after each and held to bounds (docs/soak.md). Exit 0 only if all pass.
    Soak {
        #[command(flatten)]
        vm: VmOpts,
        #[command(flatten)]
        mig: MigFlags,
        /// Migrations between the two processes (after the first, from the origin to A); at
        /// least 4, so that each process is compared in both of its states.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(4..=100_000))]
        migrations: u32,
        /// How long the guest runs on each host before it moves on, in milliseconds (100 to
        /// 30000: long enough to show progress, short of the control socket's idle limit).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(100..=30_000))]
        dwell_ms: u64,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Test-only: both processes leak this on every guest they receive.
        #[arg(long, hide = true)]
        sabotage_leak: Option<run::Leak>,
    },
    /// A TCP relay that impairs the link as netem would, where netem is missing: adds latency
    /// and jitter to every chunk (in order), stalls, or cuts every connection at set times.
    /// Prints `listening on ADDR` first; runs until killed.
    Proxy {
        /// HOST:PORT to listen on (port 0 picks a free one).
        #[arg(long)]
        listen: String,
        /// HOST:PORT to relay to.
        #[arg(long)]
        to: String,
        /// One-way delay added to every chunk, in milliseconds.
        #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
        latency_ms: f64,
        /// Each chunk's delay varies uniformly by up to this much, in milliseconds.
        #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
        jitter_ms: f64,
        /// Stall (deliver nothing) from this many milliseconds after the start ...
        #[arg(long, value_parser = parse_ms, requires = "stall_ms")]
        stall_at_ms: Option<f64>,
        /// ... for this many milliseconds.
        #[arg(long, value_parser = parse_ms, requires = "stall_at_ms")]
        stall_ms: Option<f64>,
        /// Close every connection this many milliseconds after the start, and refuse new ones.
        #[arg(long, value_parser = parse_ms)]
        cut_at_ms: Option<f64>,
        /// Seed of the jitter.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Raw TCP between two hosts, for `bench net`.
    #[command(hide = true)]
    NetProbe {
        #[command(subcommand)]
        what: NetProbe,
    },
    /// Benchmarks, printed as Markdown tables with same-run baselines.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum NetProbe {
    /// Count the bytes of one connection on ADDR.
    Listen { addr: String },
    /// Send MiB to ADDR and print the rate.
    Send {
        addr: String,
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
        mib: u64,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The same guest with no vIOMMU, a nested one and a shadow one: downtime, device-dirty
    /// pages, harvest cost, IOTLB miss rate, remap and job rates, DMA throughput against
    /// memcpy (docs/viommu.md#measured).
    Viommu {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=8192))]
        memory_mib: u64,
        /// The dirtier's rate on vCPU 0, MiB/s (0: none).
        #[arg(long, default_value_t = 32.0, value_parser = vmopts::parse_rate)]
        rate: f64,
        /// The vIOMMU client's jobs per second, the same in every design; behind a vIOMMU each
        /// is one unmap and one map (0: as fast as each design lets it).
        #[arg(long, default_value_t = 2000.0, value_parser = vmopts::parse_rate)]
        remap_rate: f64,
        /// Runs per design, interleaved; medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// How long the guest runs before measuring, in milliseconds.
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
    },
    /// read_and_clear over 4 KiB-mapped IOVA: cursor walker vs naive root walk vs a linear
    /// read+write pass over an array the size of the leaf-PTE array.
    Harvest {
        /// IOVA to map, in GiB.
        #[arg(long, default_value_t = 64)]
        iova_gib: u64,
        /// Dirty fractions (0..=1), comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.01, 1.0])]
        dirty: Vec<f64>,
        /// Formats, comma separated (amd-v1, vtd-ss, arm-lpae-s1).
        #[arg(long, value_delimiter = ',', value_parser = parse_format, default_values_t = FormatKind::ALL.to_vec())]
        formats: Vec<FormatKind>,
        /// Runs per measurement; the minimum is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also measure 1 TiB mapped: 0.1 % dirty spread uniformly, and 1 GiB dirty in
        /// clustered 2 MiB runs against a 1 GiB mapping with the same dirt (needs about 4.5 GiB
        /// of RAM).
        #[arg(long)]
        tib: bool,
        /// Skip the naive baseline (slow on large spaces).
        #[arg(long)]
        no_naive: bool,
        /// Skip iommufd's HWPT_GET_DIRTY_BITMAP against the raw walker.
        #[arg(long)]
        no_uapi: bool,
        /// Also sweep sizes for where a harvest on all cores beats one thread.
        #[arg(long)]
        threshold: bool,
    },
    /// Dirty bitmap through iommufd against type1 GET_BITMAP (same space, same pages).
    Bitmap {
        /// IOVA to map, in GiB.
        #[arg(long, default_value_t = 64)]
        iova_gib: u64,
        /// Dirty fraction (0..=1).
        #[arg(long, default_value_t = 0.01)]
        dirty: f64,
        /// Runs per measurement; the minimum is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// CPU dirty harvest under a real KVM guest: ring against bitmap, per GiB of guest RAM,
    /// at several dirty rates (the guest reports the rate it achieved).
    CpuDirty {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Configured dirty rates in MiB/s, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 64.0, 512.0, 4096.0])]
        rates: Vec<f64>,
        /// vCPUs running the dirtier.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Harvest interval in milliseconds.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Measurement time per point in milliseconds.
        #[arg(long, default_value_t = 1500)]
        ms: u64,
    },
    /// vCPU pause and resume latency with the dirtier running, against a bare thread
    /// park/unpark round trip measured in the same run.
    Pause {
        /// vCPUs, each running the dirtier.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Pause/resume cycles measured.
        #[arg(long, default_value_t = 200)]
        cycles: u32,
    },
    /// One verified live migration per device-tracking mode, same guest: downtime, total
    /// time and bytes sent, against the `none` mode and raw loopback TCP.
    Migration {
        #[command(flatten)]
        vm: VmOpts,
        /// Modes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["iommu".to_string(), "device-log".to_string(), "none".to_string()])]
        modes: Vec<String>,
        /// Verification modes, comma separated (gate, audit, off).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["gate".to_string()])]
        verify: Vec<String>,
        /// How long the guest runs before each migration, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        warmup_ms: u64,
        /// Parallel page connections.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
        channels: u16,
        /// Transports, comma separated: tcp, tls (mutual TLS with throwaway certificates),
        /// psk (an HMAC on every frame, with a random key). Compared against tcp.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["tcp".to_string()], value_parser = ["tcp", "tls", "psk"])]
        transport: Vec<String>,
        /// Send pages uncompressed.
        #[arg(long)]
        no_compress: bool,
        /// Fill guest RAM past the working set with incompressible bytes before each
        /// migration, so that pre-copy moves data rather than zero runs.
        #[arg(long)]
        fill: bool,
        /// Migrations per configuration, interleaved; medians are reported.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
    },
    /// Migrations over a grid of workloads (device DMA rate per mode, CPU dirty rate, guest
    /// size, content, page connections), each axis swept through a base point (the first
    /// value of each list), with repetitions: CSV, JSON, a summary and charts (PNG and SVG)
    /// in --out (docs/benchmarks.md#sweep).
    Sweep {
        #[command(flatten)]
        vm: VmOpts,
        /// Where the CSV, JSON, summary and charts go (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// The preset that finishes in under 3 minutes here; the lists below are then ignored
        /// (--runs and --warmup-ms still apply).
        #[arg(long)]
        quick: bool,
        /// List the grid and write the CSV header without migrating.
        #[arg(long)]
        dry: bool,
        /// Device-tracking modes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["iommu".to_string(), "device-log".to_string(), "none".to_string()], value_parser = ["iommu", "device-log", "none"])]
        modes: Vec<String>,
        /// Device DMA rates in MiB/s, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![64.0, 0.0, 16.0, 128.0, 256.0], value_parser = vmopts::parse_rate)]
        dma_rates: Vec<f64>,
        /// CPU dirty rates in MiB/s, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![64.0, 0.0, 256.0], value_parser = vmopts::parse_rate)]
        cpu_rates: Vec<f64>,
        /// Guest sizes in MiB, comma separated (up to 8192).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 2048, 4096, 8192], value_parser = clap::value_parser!(u64).range(18..=8192))]
        sizes: Vec<u64>,
        /// Page contents, comma separated (stamp, random, mixed:P).
        #[arg(long, value_delimiter = ',', default_values_t = vec![vmm::Content::Random, vmm::Content::Stamp, vmm::Content::Mixed(50)], value_parser = vmm::Content::parse)]
        contents: Vec<vmm::Content>,
        /// Page connections, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 4], value_parser = clap::value_parser!(u16).range(1..=64))]
        channels: Vec<u16>,
        /// Migrations per point, interleaved [default: 3; 2 with --quick].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: Option<u64>,
        /// How long the guest runs before each migration, in milliseconds [default: 500; 300
        /// with --quick].
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=30_000))]
        warmup_ms: Option<u64>,
    },
    /// One migration per device-tracking mode and link: loopback, and links between two
    /// network namespaces shaped with tc tbf (needs root and iproute2), with each link's raw
    /// TCP throughput from the same run: convergence, downtime, total time (docs/network.md).
    Net {
        #[command(flatten)]
        vm: VmOpts,
        #[command(flatten)]
        mig: MigFlags,
        /// Links, comma separated: loopback, or a shaped rate such as 1gbit, 10gbit, 500mbit.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["loopback".to_string(), "10gbit".to_string(), "1gbit".to_string()], value_parser = parse_net_link)]
        links: Vec<String>,
        /// Modes, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["iommu".to_string(), "device-log".to_string(), "none".to_string()], value_parser = ["iommu", "device-log", "none"])]
        modes: Vec<String>,
        /// One-way latency added by the impairing relay (`livemig proxy`), in milliseconds.
        #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
        latency_ms: f64,
        /// Jitter added by the relay, in milliseconds.
        #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
        jitter_ms: f64,
        /// How long the guest runs before each migration, in milliseconds (at most 30000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=30_000))]
        warmup_ms: u64,
        /// MiB sent to measure each link's raw TCP throughput.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
        probe_mib: u64,
    },
    /// Migrations with and without N clients polling query-migrate on the source's control
    /// socket, interleaved: downtime and total time with ÷ without, and the clients' replies.
    Control {
        #[command(flatten)]
        vm: VmOpts,
        #[command(flatten)]
        mig: MigFlags,
        /// Polling clients, each on its own connection (at most 120: the socket serves 128).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=120))]
        clients: u64,
        /// Each client's pause between two polls, in milliseconds (0.1 s: ten polls a second
        /// per client, a thousand in all).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        interval_ms: u64,
        /// Migrations per configuration (interleaved); medians are reported.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        /// How long the guest runs before each migration, in milliseconds (at most 30000).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=30_000))]
        warmup_ms: u64,
    },
    /// The transports alone (no VM): 64-page runs of incompressible data over loopback,
    /// framed and checked as a migration does, per transport and connection count; throughput
    /// and CPU time against plain TCP.
    Transport {
        /// Transports, comma separated (tcp, tls, psk).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["tcp".to_string(), "tls".to_string(), "psk".to_string()], value_parser = ["tcp", "tls", "psk"])]
        transport: Vec<String>,
        /// Connection counts, comma separated (1 to 64).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1u16, 2], value_parser = clap::value_parser!(u16).range(1..=64))]
        channels: Vec<u16>,
        /// GiB per transfer.
        #[arg(long, default_value_t = 2.0)]
        gib: f64,
        /// Transfers per configuration, interleaved; medians are reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
    },
    /// 4 KiB DMA writes through the IOTLB against memcpy.
    Dma {
        /// Runs per measurement; the minimum is reported.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

fn parse_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3_600_000.0).contains(&v) => Ok(v),
        Ok(_) => Err(format!("'{s}': must be from 0 to 3600000 milliseconds")),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

fn parse_net_link(s: &str) -> Result<String, String> {
    bench_net::parse_link(s).map(|_| s.to_string())
}

fn ms(v: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(v / 1e3)
}

fn parse_format(s: &str) -> Result<FormatKind, String> {
    vmopts::parse_format(s)
}

fn parse_mib_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v == 0.0 || v.is_finite() && (1.0..=1e7).contains(&v) => Ok(v),
        Ok(_) => Err(format!(
            "'{s}': must be 0 (unlimited) or a number of MiB/s from 1 to 10000000 (slower, a destination would \
             wait longer than its peer timeout between frames)"
        )),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=3600.0).contains(&v) => Ok(v),
        Ok(_) => Err(format!("'{s}': must be between 0.1 and 3600 seconds")),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("'{s}': {e}"))
}

fn main() {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eout!("Error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// The process's exit status for a migration's final state (`livemig migrate --help`).
fn exit_code(info: &serde_json::Value) -> i32 {
    match info["livemig"]["outcome"].as_str() {
        Some("completed") => 0,
        Some("rolled-back") => 2,
        Some("held") => 3,
        _ => 1,
    }
}

/// Set by `demo` for its children: they die with it, even when it is killed outright.
const PARENT_ENV: &str = "LIVEMIG_PARENT_PID";

fn die_with_parent() {
    let Some(want) = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<i32>().ok()) else {
        return;
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // The parent may have died before the line above: then nobody is left to kill us.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(want) {
        std::process::exit(1);
    }
}

fn run() -> Result<i32> {
    die_with_parent();
    // Usage errors exit 1 ("anything else"), not clap's 2, which `migrate` uses for a rollback.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Ok(if e.use_stderr() { 1 } else { 0 });
        }
    };
    logging::init(cli.log_format);
    match cli.cmd {
        Cmd::Demo {
            vm,
            mig,
            warmup_ms,
            json,
            tls,
            psk_file,
        } => demo::demo(
            &vm,
            mig.args(String::new()),
            warmup_ms,
            json,
            demo::Transport { tls, psk_file },
        ),
        Cmd::Run {
            vm,
            control,
            release_after,
            incoming,
            peer_timeout,
            sec,
            sabotage_leak,
        } => {
            let incoming = match incoming {
                Some(listen) => Some(run::Incoming {
                    listen,
                    opts: migration::DestOptions {
                        peer_timeout: std::time::Duration::from_secs_f64(peer_timeout),
                        security: sec.for_destination()?,
                        ..Default::default()
                    },
                    sabotage_leak,
                }),
                None if sec.cli_args().is_empty() => None,
                None => anyhow::bail!("the transport options of `run` are for --incoming (`migrate` takes its own)"),
            };
            run::run(
                &vm,
                &control,
                release_after.map(std::time::Duration::from_secs_f64),
                incoming,
            )
            .map(|()| 0)
        }
        Cmd::Migrate {
            control,
            to,
            mig,
            sec,
            json,
        } => {
            // The VM process loads the files: it may run in another directory.
            let args = mig.args(to).with_security(sec.absolute()?);
            let mut c = control::Client::connect(&control)?;
            c.execute("migrate", serde_json::to_value(args)?)?;
            let info = summary::follow(&mut c, !json)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                summary::print(&info);
            }
            Ok(exit_code(&info))
        }
        Cmd::Receive {
            listen,
            accel_dev_id,
            exit_after_ms,
            peer_timeout,
            sec,
            sabotage_resume_before_commit,
        } => receive::receive(
            &listen,
            migration::DestOptions {
                dev_id: accel_dev_id,
                peer_timeout: std::time::Duration::from_secs_f64(peer_timeout),
                security: sec.for_destination()?,
                sabotage_resume_before_commit,
                ..Default::default()
            },
            exit_after_ms,
        )
        .map(|()| 0),
        Cmd::IommuDemo {
            memory_mib,
            threads,
            writes,
        } => iommu_demo::run(memory_mib, threads, writes).map(|()| 0),
        Cmd::Soak {
            vm,
            mig,
            migrations,
            dwell_ms,
            json,
            sabotage_leak,
        } => soak::run(&soak::Args {
            vm,
            mig: mig.args(String::new()),
            migrations,
            dwell_ms,
            json,
            sabotage_leak,
        }),
        Cmd::Proxy {
            listen,
            to,
            latency_ms,
            jitter_ms,
            stall_at_ms,
            stall_ms,
            cut_at_ms,
            seed,
        } => {
            let imp = faults::Impairment {
                latency: ms(latency_ms),
                jitter: ms(jitter_ms),
                stall: stall_at_ms.zip(stall_ms).map(|(a, b)| (ms(a), ms(b))),
                cut: cut_at_ms.map(ms),
                seed,
            };
            let link = faults::ImpairedLink::start(&listen, to, imp)
                .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
            out!("listening on {}", link.addr);
            let _ = std::io::Write::flush(&mut std::io::stdout());
            loop {
                std::thread::park();
            }
        }
        Cmd::NetProbe { what } => match what {
            NetProbe::Listen { addr } => bench_net::probe_listen(&addr).map(|()| 0),
            NetProbe::Send { addr, mib } => bench_net::probe_send(&addr, mib).map(|()| 0),
        },
        Cmd::Bench { what } => bench_cmd(what).map(|()| 0),
        Cmd::Faults(a) => faults_cmd::run(&a),
    }
}

fn bench_cmd(what: BenchCmd) -> Result<()> {
    {
        match what {
            BenchCmd::Harvest {
                iova_gib,
                dirty,
                formats,
                runs,
                tib,
                no_naive,
                no_uapi,
                threshold,
            } => bench::harvest(&bench::HarvestArgs {
                iova_gib,
                fractions: dirty,
                formats,
                runs,
                tib,
                naive: !no_naive,
                uapi: !no_uapi,
                threshold,
            }),
            BenchCmd::Dma { runs } => bench::dma(runs),
            BenchCmd::Control {
                vm,
                mig,
                clients,
                interval_ms,
                runs,
                warmup_ms,
            } => bench_control::run(&bench_control::Args {
                vm,
                mig: mig.args(String::new()),
                clients: clients as usize,
                interval_ms,
                runs: runs as usize,
                warmup_ms,
            }),
            BenchCmd::Net {
                vm,
                mig,
                links,
                modes,
                latency_ms,
                jitter_ms,
                warmup_ms,
                probe_mib,
            } => bench_net::run(&bench_net::Args {
                vm,
                links,
                modes,
                mig: mig.args(String::new()),
                latency_ms,
                jitter_ms,
                warmup_ms,
                probe_mib,
            }),
            BenchCmd::Transport {
                transport,
                channels,
                gib,
                runs,
            } => bench_transport::run(&transport, &channels, gib, runs as usize),
            BenchCmd::Pause { vcpus, cycles } => bench::pause(vcpus, cycles),
            BenchCmd::Sweep {
                vm,
                out,
                quick,
                dry,
                modes,
                dma_rates,
                cpu_rates,
                sizes,
                contents,
                channels,
                runs,
                warmup_ms,
            } => {
                let mut a = if quick {
                    bench_sweep::Args::quick(vm, out)
                } else {
                    bench_sweep::Args {
                        vm,
                        out,
                        modes: modes
                            .iter()
                            .filter_map(|m| migration::DeviceTracking::parse(m))
                            .collect(),
                        dma_rates,
                        cpu_rates,
                        sizes_mib: sizes,
                        contents,
                        channels,
                        runs: 3,
                        warmup_ms: 500,
                        dry,
                    }
                };
                a.dry = dry;
                a.runs = runs.map_or(a.runs, |r| r as usize);
                a.warmup_ms = warmup_ms.unwrap_or(a.warmup_ms);
                bench_sweep::run(&a)
            }
            BenchCmd::Migration {
                vm,
                modes,
                verify,
                warmup_ms,
                channels,
                transport,
                no_compress,
                fill,
                runs,
            } => bench_migration::run(&bench_migration::Args {
                vm,
                modes,
                verify,
                transports: transport,
                warmup_ms,
                channels,
                compress: !no_compress,
                fill,
                runs: runs as usize,
            }),
            BenchCmd::CpuDirty {
                memory_mib,
                rates,
                vcpus,
                interval_ms,
                ms,
            } => bench::cpu_dirty(memory_mib, &rates, vcpus, interval_ms, ms),
            BenchCmd::Bitmap { iova_gib, dirty, runs } => bench::bitmap(iova_gib, dirty, runs),
            BenchCmd::Viommu {
                memory_mib,
                rate,
                remap_rate,
                runs,
                warmup_ms,
            } => bench_viommu::run(&bench_viommu::Args {
                memory_mib,
                rate,
                remap_rate,
                runs: runs as usize,
                warmup_ms,
            }),
        }
    }
}
