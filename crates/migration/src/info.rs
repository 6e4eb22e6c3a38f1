//! What `query-migrate` returns and the demo prints: field names follow QEMU's
//! `MigrationInfo` where one exists; livemig's own fields are under `livemig`.

use serde::Serialize;

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
    /// Pages sent raw.
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
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    /// Pages dirtied per second by the vCPUs / by the device, over the pre-copy iterations.
    pub cpu_dirty_pages_rate: u64,
    pub device_dirty_pages_rate: u64,
    pub cpu_dirty_pages: u64,
    pub device_dirty_pages: u64,
    pub downtime_limit_ms: u64,
    /// Dirty pages sent while the vCPUs were paused.
    pub final_pages: u64,
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
    /// Time the destination spent verifying, excluded from `downtime`.
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
