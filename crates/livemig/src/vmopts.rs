//! The options that describe a VM and its guest program, shared by `run`, `demo` and
//! `bench migration`.

use anyhow::{bail, Result};
use clap::Args;
use iommu::FormatKind;
use vmm::layout::WORKSET_BASE;
use vmm::programs::ctrl::DMA_CHUNK;
use vmm::{AccelSetup, Content, DeviceSet, DirtyLogMode, DmaLoad, Pattern, Program, ViommuMode, Vm, VmConfig};

#[derive(Args, Clone, Debug)]
pub struct VmOpts {
    /// Guest RAM in MiB (18 to 8192, the ceiling for a source and a destination sharing this
    /// 24 GiB host; past 3 GiB the RAM goes on at 4 GiB, above the devices' registers).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(MIN_MEM_MIB..=MAX_MEM_MIB))]
    pub memory_mib: u64,
    /// vCPUs (1 to 32); each runs the dirtier over its own slice of the working set.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_VCPUS as i64))]
    pub vcpus: u32,
    /// Dirtier rate in MiB/s per VM (0: no dirtier).
    #[arg(long, default_value_t = 256.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Dirtier working set in MiB, placed from 16 MiB up [default: 512, or what fits].
    #[arg(long)]
    pub ws_mib: Option<u64>,
    /// Dirtier pattern: sequential, uniform or hotcold.
    #[arg(long, default_value = "uniform", value_parser = parse_pattern)]
    pub pattern: Pattern,
    /// CPU dirty tracking: ring or bitmap.
    #[arg(long, default_value = "ring", value_parser = ["ring", "bitmap"])]
    pub dirty_log: String,
    /// Dirty ring entries per vCPU (a power of two, 256..=65536).
    #[arg(long, default_value_t = 65536)]
    pub ring_entries: u32,
    /// No accelerator (and no accel-client); the same as `--devices 0`.
    #[arg(long, conflicts_with = "devices")]
    pub no_accel: bool,
    /// Accelerators (0 to 3), each behind its own IOMMU domain unless `--shared-domain`.
    /// vCPU k drives device k, so with fewer vCPUs than devices the rest sit idle (their
    /// state still migrates).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=vmm::layout::MAX_DEVICES as i64))]
    pub devices: u32,
    /// Put every accelerator behind one IOMMU domain (one HWPT, one dirty bitmap).
    #[arg(long)]
    pub shared_domain: bool,
    /// What the working set's pages hold: stamp (compressible), random (incompressible) or
    /// mixed:P (P % of the pages random).
    #[arg(long, default_value = "stamp", value_parser = Content::parse)]
    pub content: Content,
    /// Device DMA rate in MiB/s per VM, split over the accelerators that have a client (0:
    /// none). Each client's device copies 64 KiB chunks into a working set of its own, paced
    /// like the dirtier; the migration reports the rate achieved.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub dma_rate: f64,
    /// The devices' DMA working set in MiB, after the dirtier's, split over the devices.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub dma_mib: u64,
    /// Fill guest RAM past the working sets with incompressible bytes before the guest
    /// starts, as a guest that has used its memory would have it (fresh RAM is zero pages,
    /// which cost almost nothing to migrate).
    #[arg(long)]
    pub fill_ram: bool,
    /// IOMMU page-table format: amd-v1, vtd-ss or arm-lpae-s1.
    #[arg(long, default_value = "vtd-ss", value_parser = parse_format)]
    pub iommu_format: FormatKind,
    /// Map guest RAM in the IOMMU with 4 KiB leaves only (default: huge leaves, split
    /// eagerly when dirty tracking starts).
    #[arg(long)]
    pub iommu_4k: bool,
    /// The guest's own IOMMU in front of the accelerator: off, nested (the guest's VT-d
    /// first-stage table on the host's stage 2) or shadow (virtio-iommu-style MAP/UNMAP
    /// requests the VMM carries out). With one, the last vCPU runs the vIOMMU client, which
    /// maps, unmaps and remaps buffers while the device fills them; the other vCPUs run the
    /// dirtier (none with one vCPU). One device, no DMA writer (docs/viommu.md).
    #[arg(long, default_value = "off", value_parser = parse_viommu)]
    pub viommu: ViommuMode,
}

pub fn parse_viommu(s: &str) -> Result<ViommuMode, String> {
    ViommuMode::parse(s).ok_or_else(|| format!("unknown vIOMMU '{s}' (off, nested, shadow)"))
}

const MIN_MEM_MIB: u64 = vmm::layout::MIN_MEM >> 20;
const MAX_MEM_MIB: u64 = vmm::layout::MAX_MEM >> 20;
use vmm::layout::MAX_VCPUS;

pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e6).contains(&v) => Ok(v),
        Ok(_) => Err(format!("'{s}': must be a number of MiB/s from 0 to 1000000")),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    match s {
        "sequential" => Ok(Pattern::Sequential),
        "uniform" => Ok(Pattern::Uniform),
        "hotcold" => Ok(Pattern::HotCold {
            hot_pages: 1024,
            hot_pct: 90,
        }),
        _ => Err(format!("unknown pattern '{s}' (sequential, uniform, hotcold)")),
    }
}

pub fn parse_format(s: &str) -> Result<FormatKind, String> {
    FormatKind::parse(s).ok_or_else(|| format!("unknown format '{s}' (amd-v1, vtd-ss, arm-lpae-s1)"))
}

impl VmOpts {
    pub fn config(&self) -> Result<VmConfig> {
        let dirty = match self.dirty_log.as_str() {
            "bitmap" => DirtyLogMode::Bitmap,
            _ => DirtyLogMode::Ring {
                entries: self.ring_entries,
            },
        };
        let accel = AccelSetup {
            format: self.iommu_format,
            huge_pages: !self.iommu_4k,
            eager_split: !self.iommu_4k,
            viommu: self.viommu,
            ..Default::default()
        };
        let devices = DeviceSet {
            accels: vec![accel; self.device_count() as usize],
            shared_domain: self.shared_domain,
        };
        Ok(VmConfig {
            mem_mib: self.memory_mib,
            regions: 1,
            vcpus: self.vcpus,
            dirty,
            devices,
        })
    }

    /// Accelerators asked for.
    pub fn device_count(&self) -> u32 {
        if self.no_accel {
            0
        } else {
            self.devices
        }
    }

    /// The working set in MiB, checked against the memory size (and the DMA writers' set,
    /// which follows it).
    pub fn ws(&self) -> Result<u64> {
        // Both working sets sit in RAM below the hole at 3 GiB.
        let low = self.memory_mib.saturating_mul(1 << 20).min(vmm::layout::LOW_RAM_MAX);
        let avail = (low.saturating_sub(WORKSET_BASE) >> 20).saturating_sub(self.dma_set_mib());
        let ws = self.ws_mib.unwrap_or(avail.min(512));
        if ws == 0 || ws > avail {
            bail!(
                "--ws-mib must be between 1 and {avail} for {} MiB of RAM{} (the working sets stay below 3 GiB)",
                self.memory_mib,
                match self.dma_set_mib() {
                    0 => String::new(),
                    d => format!(" and a {d} MiB DMA working set"),
                }
            );
        }
        Ok(ws)
    }

    /// Accelerators with a client (vCPU k drives device k), which run the DMA writers.
    fn driven_devices(&self) -> u32 {
        self.device_count().min(self.vcpus)
    }

    /// The vCPUs that run the dirtier: all, or all but the vIOMMU client's (the last).
    fn dirtier_vcpus(&self) -> u32 {
        match self.viommu {
            ViommuMode::Off => self.vcpus,
            _ => self.vcpus - 1,
        }
    }

    /// MiB the DMA writers' working set takes (0 without writers).
    fn dma_set_mib(&self) -> u64 {
        if self.dma_rate > 0.0 && self.driven_devices() > 0 {
            self.dma_mib
        } else {
            0
        }
    }

    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate.is_finite() && (0.0..=1e6).contains(&self.rate)) {
            bail!("--rate must be a number of MiB/s from 0 to 1000000");
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            bail!("--vcpus must be between 1 and {MAX_VCPUS}");
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.memory_mib) {
            bail!("--memory-mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}");
        }
        if !self.memory_mib.is_multiple_of(2) {
            bail!("--memory-mib must be even: guest RAM is laid out in 2 MiB pages");
        }
        let low_mib = self.memory_mib.min(vmm::layout::LOW_RAM_MAX >> 20);
        if self.dma_set_mib() > 0 && self.dma_mib + 1 > low_mib.saturating_sub(WORKSET_BASE >> 20) {
            bail!(
                "--dma-mib {} does not fit: the working sets stay below 3 GiB, and {} MiB of RAM leaves {} MiB \
                 there for both",
                self.dma_mib,
                self.memory_mib,
                low_mib.saturating_sub(WORKSET_BASE >> 20)
            );
        }
        if !(self.dma_rate.is_finite() && (0.0..=1e6).contains(&self.dma_rate)) {
            bail!("--dma-rate must be a number of MiB/s from 0 to 1000000");
        }
        if self.dma_rate > 0.0 && self.driven_devices() == 0 {
            bail!("--dma-rate needs an accelerator driven by a vCPU (--devices 1 or more)");
        }
        if self.viommu != ViommuMode::Off {
            if self.device_count() != 1 || self.shared_domain {
                bail!("--viommu is modelled for one accelerator (--devices 1, no --shared-domain)");
            }
            if self.dma_rate > 0.0 {
                bail!("--dma-rate runs the accel-client's DMA writer; with --viommu the device runs the vIOMMU client");
            }
        }
        if self.dma_set_mib() > 0 && self.dma_mib < self.driven_devices() as u64 {
            bail!(
                "--dma-mib must give each of the {} devices at least 1 MiB",
                self.driven_devices()
            );
        }
        self.ws().map(|_| ())
    }

    /// Builds the VM and loads the guest programs (not started).
    pub fn build(&self) -> Result<Vm> {
        self.validate()?;
        let vm = Vm::new(self.config()?)?;
        let dirtiers = self.dirtier_vcpus();
        if self.viommu != ViommuMode::Off {
            let client = self.vcpus - 1;
            vm.programs().load(client, &Program::viommu_client(0, 1))?;
            if dirtiers == 0 && self.rate > 0.0 {
                tracing::warn!("with one vCPU the vIOMMU client runs alone: no dirtier (--vcpus 2 adds one)");
            }
        }
        let slice = (self.ws()? << 20) / 4096 / dirtiers.max(1) as u64;
        if slice == 0 {
            bail!("the working set is too small for {dirtiers} vCPUs");
        }
        for v in 0..dirtiers {
            let mut p = Program::dirtier(
                WORKSET_BASE + v as u64 * slice * 4096,
                slice,
                self.rate / dirtiers as f64,
                self.pattern,
            );
            p.dirtier = self.rate > 0.0;
            p.content = self.content;
            // vCPU k also drives accelerator k (behind a vIOMMU, the client does).
            if v < self.device_count() && self.viommu == ViommuMode::Off {
                p.accel_queue = Some(1);
                p.accel_device = v;
                if self.dma_set_mib() > 0 {
                    let per = (self.dma_mib << 20) / self.driven_devices() as u64 / DMA_CHUNK * DMA_CHUNK;
                    p.dma = Some(DmaLoad {
                        rate_mib_s: self.dma_rate / self.driven_devices() as f64,
                        base: WORKSET_BASE + (self.ws()? << 20) + v as u64 * per,
                        pages: per / 4096,
                    });
                }
            }
            vm.programs().load(v, &p)?;
        }
        if self.fill_ram {
            vm.programs()
                .fill_incompressible(WORKSET_BASE + ((self.ws()? + self.dma_set_mib()) << 20))?;
        }
        Ok(vm)
    }
}
