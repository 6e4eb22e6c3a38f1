//! What `query-migrate` returns and the demo prints: field names follow QEMU's
//! `MigrationInfo` where one exists; livemig's own fields are under `livemig`.

use serde::Serialize;

/// QEMU's `MigrationStatus` values livemig uses. `completed` only when the destination
/// confirmed that it runs the guest and verification (if asked for) passed; any failure,
/// verification included, is `failed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    None,
    Setup,
    Active,
    Device,
    Completed,
    Failed,
    Cancelled,
}

/// How a migration ended for the source's VM (livemig's own field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Still running.
    #[default]
    None,
    /// The destination runs the guest (and it verified, if asked); the source holds its
    /// paused copy until it is released.
    Completed,
    /// Failed before the source committed: the source runs the guest again.
    RolledBack,
    /// Failed after the source committed: the source holds the guest paused and resumable,
    /// and an operator decides (see `destination` and `docs/protocol.md`).
    Held,
}

/// What the source knows of the destination's guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestState {
    /// Not built, or still receiving.
    #[default]
    None,
    /// It holds the whole guest and waits for the commit.
    Ready,
    /// It confirmed that its guest runs.
    Running,
    /// It said it discarded its guest (it never ran it, or it failed verification).
    Discarded,
    /// The commit was sent, but no word came back: it may run the guest or not.
    Unknown,
}

/// The parts of the downtime as the source sees them, in microseconds, in order.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DowntimeParts {
    /// Parking the vCPUs.
    pub pause: u64,
    /// Devices to STOP_COPY and reading their state.
    pub device_state: u64,
    /// The last harvest and sending the pages it found.
    pub final_pages: u64,
    /// Saving and sending the vCPU state, and the end of the stream.
    pub vcpu_state: u64,
    /// Hashing the source's memory for the gate (0 without it).
    pub verification: u64,
    /// Waiting for the destination to apply, load, compare and report ready.
    pub destination: u64,
    /// From the commit to the destination's vCPUs running.
    pub commit: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamInfo {
    /// Bytes written to the sockets for RAM, headers included.
    pub transferred: u64,
    /// Bytes of dirty pages known and not yet sent.
    pub remaining: u64,
    pub total: u64,
    /// Zero pages (sent as zero runs).
    pub duplicate: u64,
    /// Pages sent with their data, raw or compressed (QEMU's meaning: not zero pages).
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages per second dirtied (CPU and device), at the last sync.
    pub dirty_pages_rate: u64,
    /// Megabits per second, at the last period.
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub page_size: u64,
    pub iteration_count: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VfioInfo {
    pub transferred: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LivemigInfo {
    pub mode: String,
    pub cpu_dirty_log: String,
    pub channels: u16,
    /// Devices the VM has (each with its VFIO migration state).
    pub devices: u32,
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    /// Pages dirtied per second by the vCPUs / by the device, over the pre-copy iterations.
    pub cpu_dirty_pages_rate: u64,
    pub device_dirty_pages_rate: u64,
    pub cpu_dirty_pages: u64,
    pub device_dirty_pages: u64,
    /// What the guest's programs achieved over pre-copy, by their own counters (not what was
    /// asked): MiB/s written by the vCPUs' dirtiers and by the devices' DMA writers.
    pub guest_cpu_write_mib_s: f64,
    pub guest_dma_write_mib_s: f64,
    pub downtime_limit_ms: u64,
    /// Dirty pages sent while the vCPUs were paused.
    pub final_pages: u64,
    /// `gate`, `audit` or `off`.
    pub verify: String,
    /// `tcp`, `tls` or `psk`.
    pub transport: String,
    /// Time from the bulk round's start to the switchover, in which `ram.precopy-bytes`
    /// were sent (less the handshake's few).
    pub precopy_ms: f64,
    pub outcome: Outcome,
    pub destination: DestState,
    pub downtime_parts: DowntimeParts,
    /// `shared`: the downtime is from the source's pause to the destination's resume on the
    /// one monotonic clock both processes read; `source`: they run on different kernels, and
    /// it ends when the source heard that the destination runs (a bound from above).
    pub downtime_clock: String,
    /// The guest's own blackout: from its last visible progress on the source to its first
    /// on the destination (shared clock only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_blackout_us: Option<u64>,
    /// Harvests during this migration that found a dirty-ring overrun and counted every page
    /// as dirty.
    pub dirty_ring_overruns: u64,
    /// Expected downtime at the moment of switchover.
    pub expected_downtime_at_switchover_ms: u64,
    /// `converged` or `max-iterations`.
    pub switchover_reason: String,
    /// Guest-memory verification: `None` when not asked for.
    pub verified: Option<bool>,
    pub verify_detail: String,
    /// Destination guest counters at switchover and after it ran on.
    pub dest_pages_before: u64,
    pub dest_pages_after: u64,
    pub dest_jobs_before: u64,
    pub dest_jobs_after: u64,
    /// Time the destination spent comparing digests before resuming (gate), part of the
    /// downtime.
    pub dest_verify_ms: f64,
    pub source_vcpus_running: bool,
    /// The phase a failed or cancelled migration was in: setup, active or device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<Status>,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Status,
    pub total_time: u64,
    pub setup_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Downtime in microseconds (QEMU reports milliseconds only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
    pub expected_downtime: u64,
    pub cpu_throttle_percentage: u8,
    pub ram: RamInfo,
    pub vfio: VfioInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    pub livemig: LivemigInfo,
}
