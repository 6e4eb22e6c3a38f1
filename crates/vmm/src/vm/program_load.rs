//! Loading guest programs into a VM: code, control page and the accel-client's area, and
//! reading back the counters they keep.

use super::*;

/// What a VM's guest programs are: loading them and reading back what they count. A view of
/// the VM ([`Vm::programs`]), so that the VM's own surface stays its memory, vCPUs and devices.
pub struct Programs<'a>(pub(super) &'a Vm);

impl Programs<'_> {
    /// Loads `prog` for `vcpu`: code, control page, and the accel-client's area (and its DMA
    /// writer's source). Call before the vCPU first runs.
    pub fn load(&self, vcpu: u32, prog: &Program) -> Result<(), VmError> {
        self.0.load_program(vcpu, prog)
    }
    /// The program counters of `vcpu`.
    pub fn counters(&self, vcpu: u32) -> Counters {
        self.0.counters(vcpu)
    }
    /// The device whose window device `dev`'s client sends its peer-to-peer writes to.
    pub fn peer_of(&self, dev: u32) -> Option<u32> {
        self.0.peer_of(dev)
    }
    /// Fills guest RAM from `from` to its end with bytes that do not compress (see
    /// `program_load.rs`); returns the bytes filled.
    pub fn fill_incompressible(&self, from: u64) -> Result<u64, VmError> {
        self.0.fill_incompressible(from)
    }
}

impl Vm {
    /// Fills guest RAM from `from` to its end with bytes that do not compress: a benchmark's
    /// stand-in for memory a guest uses (zero pages cross the wire as a few bytes). The guest
    /// programs never touch RAM past their working set, so that is where it belongs.
    pub(crate) fn fill_incompressible(&self, from: u64) -> Result<u64, VmError> {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(from);
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        for s in &self.slots {
            let (mut at, end) = (from.max(s.gpa), s.gpa + s.size);
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                rng.fill_bytes(&mut buf[..n]);
                self.memory()
                    .write_slice(&buf[..n], GuestAddress(at))
                    .map_err(|e| VmError::Config(format!("filling guest RAM at {at:#x}: {e}")))?;
                at += n as u64;
                filled += n as u64;
            }
        }
        Ok(filled)
    }

    /// Loads `prog` for `vcpu`: code, control page, and the accel-client's area. Call before
    /// the vCPU first runs.
    pub(crate) fn load_program(&self, vcpu: u32, prog: &Program) -> Result<(), VmError> {
        if vcpu >= self.cfg.vcpus {
            return Err(VmError::Config(format!("no vCPU {vcpu}")));
        }
        let end = prog.ws_base.saturating_add(prog.ws_pages.saturating_mul(4096));
        if prog.ws_pages == 0
            || prog.ws_base < WORKSET_BASE
            || !prog.ws_base.is_multiple_of(4096)
            || !self.is_ram(prog.ws_base, end)
        {
            return Err(VmError::Config(format!(
                "working set must be a non-empty page range of RAM from {WORKSET_BASE:#x} (RAM: {})",
                self.ram_ranges()
            )));
        }
        if let Some(q) = prog.accel_queue {
            let Some(d) = self.devices.get(prog.accel_device as usize) else {
                return Err(VmError::Config(format!(
                    "the accel-client needs accelerator {}; the VM has {}",
                    prog.accel_device,
                    self.devices.len()
                )));
            };
            if q as u32 >= d.accel.config().qp_num {
                return Err(VmError::Config(format!("accel queue {q} out of range")));
            }
        }
        if !(0.0..=1e6).contains(&prog.rate_mib_s) {
            return Err(VmError::Config("rate must be between 0 and 1e6 MiB/s".into()));
        }
        let dev = prog.accel_device;
        let drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if prog.accel_queue.is_some() {
            if let Some(other) = (0..drivers.len()).find(|&v| v != vcpu as usize && drivers[v] == Some(dev)) {
                return Err(VmError::Config(format!(
                    "vCPU {other} already drives accelerator {dev}: one client per device"
                )));
            }
        }
        let viommu = self
            .devices
            .get(dev as usize)
            .map_or(crate::ViommuMode::Off, |d| d.viommu);
        if prog.viommu_client {
            if prog.accel_queue.is_none() {
                return Err(VmError::Config("the vIOMMU client needs an accelerator queue".into()));
            }
            if !(0.0..=1e6).contains(&prog.remap_rate) {
                return Err(VmError::Config(
                    "the remap rate must be between 0 and 1e6 per second".into(),
                ));
            }
            if prog.dirtier || prog.dma.is_some() {
                return Err(VmError::Config(
                    "the vIOMMU client runs alone on its vCPU: no dirtier, no DMA writer".into(),
                ));
            }
        } else if prog.accel_queue.is_some() && viommu != crate::ViommuMode::Off {
            return Err(VmError::Config(format!(
                "accelerator {dev} is behind a {viommu} vIOMMU: drive it with the vIOMMU client"
            )));
        }
        if prog.accel_queue.is_some() && !prog.viommu_client && self.dma_reach(dev, prog.ws_base, prog.ws_pages) == 0 {
            return Err(VmError::Config(format!(
                "the accelerator cannot reach the working set at {:#x} (a reserved IOVA window)",
                prog.ws_base
            )));
        }
        let dma_qn = self.check_dma(prog)?;
        let spec = workload::Spec {
            dirtier: prog.dirtier.then_some(prog.pattern),
            accel: prog.accel_queue.is_some(),
            dma: prog.dma.is_some(),
        };
        let text = if prog.viommu_client {
            let mode = match viommu {
                crate::ViommuMode::Off => viommu_client::Mode::Off,
                crate::ViommuMode::Nested => viommu_client::Mode::Nested,
                crate::ViommuMode::Shadow => viommu_client::Mode::Shadow,
            };
            viommu_client::assemble(code(vcpu), mode)
        } else {
            workload::assemble(code(vcpu), spec)
        }
        .map_err(|e| VmError::Assemble(e.to_string()))?;
        if text.len() as u64 > CODE_SIZE {
            return Err(VmError::Internal("program too large"));
        }
        self.fill_content(prog)?;
        let w = |off: u64, v: u64| self.mem.write_obj(v, GuestAddress(ctrl_page(vcpu) + off));
        let merr = |e: vm_memory::GuestMemoryError| VmError::Memory(e.to_string());
        self.mem.write_slice(&text, GuestAddress(code(vcpu))).map_err(merr)?;
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(ctrl_page(vcpu)))
            .map_err(merr)?;
        let tpp = if prog.rate_mib_s == 0.0 {
            0
        } else {
            self.ticks_per(4096, prog.rate_mib_s)
        };
        let (pattern, hot_pages, hot_pct) = match prog.pattern {
            Pattern::Sequential => (0, 0, 0),
            Pattern::Uniform => (1, 0, 0),
            Pattern::HotCold { hot_pages, hot_pct } => (2, hot_pages.clamp(1, prog.ws_pages), hot_pct.min(100)),
        };
        let flags = if prog.dirtier { FLAG_DIRTIER } else { 0 }
            | if prog.accel_queue.is_some() { FLAG_ACCEL } else { 0 }
            | if prog.dma.is_some() { FLAG_DMA } else { 0 };
        for (off, v) in [
            (C_MAGIC, MAGIC),
            (C_FLAGS, flags),
            (C_TSC_KHZ, self.tsc_khz as u64),
            (C_TICKS_PER_PAGE, tpp),
            (C_WS_BASE, prog.ws_base),
            (C_WS_PAGES, prog.ws_pages),
            (C_PATTERN, pattern),
            (C_HOT_PAGES, hot_pages),
            (C_HOT_PCT, hot_pct),
            (C_SEED, prog.seed | 1),
            (C_VCPU, vcpu as u64),
            (C_MMIO, accel_mmio(dev)),
            (C_AREA, accel_area(dev)),
            (C_QN, prog.accel_queue.unwrap_or(0) as u64),
            (C_BURST, workload::DEFAULT_BURST),
            (C_DMA_PAGES, self.dma_reach(dev, prog.ws_base, prog.ws_pages)),
            (C_PEER, self.peer_of(dev).map_or(0, peer_window)),
            (
                C_DMA_TICKS,
                prog.dma.map_or(0, |d| self.ticks_per(DMA_CHUNK, d.rate_mib_s)),
            ),
            (C_DMA_BASE, prog.dma.map_or(0, |d| d.base)),
            (C_DMA_CHUNKS, prog.dma.map_or(0, |d| d.pages * 4096 / DMA_CHUNK)),
            (C_DMA_QN, dma_qn),
            (C_VIOMMU_MMIO, viommu_mmio(dev)),
            (C_VIOMMU_AREA, viommu_area(dev)),
            (C_VIOMMU_IOVA, VIOMMU_IOVA),
            (
                C_VIOMMU_TICKS,
                if prog.remap_rate > 0.0 {
                    ((self.tsc_khz as f64 * 1000.0) / prog.remap_rate).round().max(1.0) as u64
                } else {
                    0
                },
            ),
        ] {
            w(off, v).map_err(merr)?;
        }
        if prog.accel_queue.is_some() {
            self.mem
                .write_slice(&vec![0u8; ACCEL_AREA_SIZE as usize], GuestAddress(accel_area(dev)))
                .map_err(merr)?;
            let table: Vec<u8> = crc32c_table().iter().flat_map(|v| v.to_le_bytes()).collect();
            self.mem
                .write_slice(&table, GuestAddress(accel_area(dev) + A_CRC_TABLE))
                .map_err(merr)?;
            if prog.dma.is_some() {
                self.fill_dma_source(prog, accel_area(dev) + A_DMA_SRC)?;
            }
            // Zeroing the area took the firmware's stage-1 tables with it.
            if viommu == crate::ViommuMode::Nested {
                crate::viommu::NestedViommu::write_firmware_tables(&self.mem, viommu_area(dev), VIOMMU_IOVA)
                    .map_err(VmError::Memory)?;
            }
        }
        self.drivers.lock().unwrap_or_else(|e| e.into_inner())[vcpu as usize] = prog.accel_queue.map(|_| dev);
        Ok(())
    }

    /// The RAM ranges, for error messages.
    fn ram_ranges(&self) -> String {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for s in &self.slots {
            match v.last_mut() {
                Some(last) if last.1 == s.gpa => last.1 += s.size,
                _ => v.push((s.gpa, s.gpa + s.size)),
            }
        }
        v.iter()
            .map(|(a, b)| format!("[{a:#x}, {b:#x})"))
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// TSC ticks per `bytes` at `rate_mib_s` (at least 1).
    fn ticks_per(&self, bytes: u64, rate_mib_s: f64) -> u64 {
        ((self.tsc_khz as f64 * 1000.0) * bytes as f64 / (rate_mib_s * 1048576.0))
            .round()
            .max(1.0) as u64
    }

    /// Checks `prog`'s DMA writer and returns the queue it submits on (the one after the
    /// client's); 0 without a writer.
    fn check_dma(&self, prog: &Program) -> Result<u64, VmError> {
        let Some(d) = prog.dma else { return Ok(0) };
        let bad = |why: String| Err(VmError::Config(format!("DMA writer: {why}")));
        let Some(q) = prog.accel_queue else {
            return bad("it runs in the accel-client, and this program has none".into());
        };
        let qp_num = self.devices[prog.accel_device as usize].accel.config().qp_num;
        if qp_num < 2 {
            return bad("it needs a second queue pair on the device".into());
        }
        if !(d.rate_mib_s > 0.0 && d.rate_mib_s <= 1e6) {
            return bad(format!("rate {} MiB/s is not in (0, 1000000]", d.rate_mib_s));
        }
        let chunk_pages = DMA_CHUNK / 4096;
        let end = d.base.saturating_add(d.pages.saturating_mul(4096));
        if d.pages < chunk_pages
            || !d.pages.is_multiple_of(chunk_pages)
            || !d.base.is_multiple_of(4096)
            || d.base < WORKSET_BASE
            || !self.is_ram(d.base, end)
        {
            return bad(format!(
                "its working set must be whole {} KiB chunks of RAM from {WORKSET_BASE:#x} (RAM: {})",
                DMA_CHUNK >> 10,
                self.ram_ranges()
            ));
        }
        let ws_end = prog.ws_base + prog.ws_pages * 4096;
        // The client's COPY and LZ4 jobs read the working set whether or not the dirtier runs.
        if d.base < ws_end && prog.ws_base < end {
            return bad("its working set overlaps the program's working set".into());
        }
        if self.dma_reach(prog.accel_device, d.base, d.pages) != d.pages {
            return bad(format!(
                "the device cannot reach all of [{:#x}, {end:#x}) (a reserved IOVA window)",
                d.base
            ));
        }
        Ok((q as u64 + 1) % qp_num as u64)
    }

    /// The megabyte the DMA writer copies from: per 4 KiB page, random bytes where
    /// `prog.content` makes pages random, a constant byte elsewhere (compressible, like stamps).
    fn fill_dma_source(&self, prog: &Program, at: u64) -> Result<(), VmError> {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(prog.seed ^ at);
        let mut page = [0u8; 4096];
        for i in 0..A_DMA_SRC_SIZE / 4096 {
            if prog.content.is_random(i) {
                rng.fill_bytes(&mut page);
            } else {
                page.fill(0x5a);
            }
            self.mem
                .write_slice(&page, GuestAddress(at + i * 4096))
                .map_err(|e| VmError::Memory(e.to_string()))?;
        }
        Ok(())
    }

    /// Writes the working set's pages as `prog.content` asks: random pages get random bytes
    /// after the stamp's 32 (which stay zero until the dirtier writes the page, as the
    /// accel-client's check of a copied, never-written page expects). With `Mixed`, the other
    /// pages are zeroed; with `Stamp`, nothing is written (fresh guest RAM is zero).
    fn fill_content(&self, prog: &Program) -> Result<(), VmError> {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(prog.seed ^ prog.ws_base);
        let mut page = [0u8; 4096];
        for pfn in prog.ws_base / 4096..prog.ws_base / 4096 + prog.ws_pages {
            let random = prog.content.is_random(pfn);
            if random {
                rng.fill_bytes(&mut page[32..]);
            } else {
                page[32..].fill(0);
            }
            if random || prog.content != Content::Stamp {
                self.mem
                    .write_slice(&page, GuestAddress(pfn * 4096))
                    .map_err(|e| VmError::Memory(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The device whose window device `dev`'s client sends its peer-to-peer writes to: the
    /// next one, when there are several.
    pub(crate) fn peer_of(&self, dev: u32) -> Option<u32> {
        let n = self.devices.len() as u32;
        (n > 1).then(|| (dev + 1) % n)
    }

    /// Pages from `base` (at most `pages`) the accelerator can DMA to without leaving the
    /// IOAS's mapped areas.
    fn dma_reach(&self, dev: u32, base: u64, pages: u64) -> u64 {
        let Some(io) = self.devices.get(dev as usize) else {
            return pages;
        };
        let areas = io.fd.ioas_areas(io.ioas).unwrap_or_default();
        let mut end = base;
        while let Some(&(iova, len, _)) = areas.iter().find(|&&(iova, len, _)| iova <= end && end < iova + len) {
            end = iova + len;
        }
        ((end - base) / 4096).min(pages)
    }

    /// The program counters of `vcpu`.
    pub(crate) fn counters(&self, vcpu: u32) -> Counters {
        let r = |off: u64| {
            self.mem
                .read_obj::<u64>(GuestAddress(ctrl_page(vcpu) + off))
                .unwrap_or(0)
        };
        Counters {
            pages_written: r(K_PAGES),
            tsc_start: r(K_TSC_START),
            tsc_now: r(K_TSC_NOW),
            jobs_submitted: r(K_SUBMITTED),
            jobs_completed: r(K_COMPLETED),
            errors: r(K_ERRORS),
            loops: r(K_LOOPS),
            dma_chunks: r(K_DMA_DONE),
        }
    }
}
