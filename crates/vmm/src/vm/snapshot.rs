//! Saving and loading a VM's vCPUs and devices: the hooks a migration calls at switchover.

use super::*;

/// Saving and restoring a VM's vCPU and device state, in the P2P order (see below). A view of
/// the VM ([`Vm::snapshots`]).
pub struct Snapshots<'a>(pub(super) &'a Vm);

impl Snapshots<'_> {
    /// Every vCPU's state (the vCPUs must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmError> {
        self.0.save_vcpus()
    }
    /// Loads every vCPU's state (the vCPUs must be paused).
    pub fn restore_vcpus(&self, states: &[VcpuState]) -> Result<(), VmError> {
        self.0.restore_vcpus(states)
    }
    /// Device and vCPU state together, devices stopped in the P2P order.
    pub fn take(&self) -> Result<VmSnapshot, VmError> {
        self.0.snapshot_devices_and_vcpus()
    }
    /// Loads what `take` saved.
    pub fn restore(&self, snap: &VmSnapshot) -> Result<(), VmError> {
        self.0.restore(snap)
    }
    /// The platform state that migrates beside the vCPUs: each device's vIOMMU registers and
    /// (shadow) mapping table, as bytes (the vCPUs must be paused, so the guest changes none).
    pub fn save_platform(&self) -> Vec<u8> {
        let mut b = vec![self.0.devices.len() as u8];
        for d in &self.0.devices {
            let st = d.viommu_state.as_ref().map(|v| v.save()).unwrap_or_default();
            b.push(d.viommu.register() as u8);
            b.extend_from_slice(&(st.len() as u32).to_le_bytes());
            b.extend_from_slice(&st);
        }
        b
    }
    /// Loads what `save_platform` saved into this never-run VM; refuses a state of another
    /// device list or vIOMMU design.
    pub fn restore_platform(&self, b: &[u8]) -> Result<(), VmError> {
        let bad = |why: String| VmError::Config(format!("platform state: {why}"));
        let devices = &self.0.devices;
        let parts = crate::viommu::parse_platform(b).map_err(bad)?;
        if parts.len() != devices.len() {
            return Err(bad(format!(
                "for {} devices, this VM has {}",
                parts.len(),
                devices.len()
            )));
        }
        for (d, (mode, st)) in devices.iter().zip(parts) {
            if mode != d.viommu.register() as u8 {
                return Err(bad(format!(
                    "{}: a vIOMMU mode {mode} where this VM has {}",
                    d.name, d.viommu
                )));
            }
            match &d.viommu_state {
                Some(v) => v.restore(st).map_err(|e| bad(format!("{}: {e}", d.name)))?,
                None if st.is_empty() => {}
                None => return Err(bad(format!("{}: state for a device without a vIOMMU", d.name))),
            }
        }
        Ok(())
    }
}

impl Vm {
    /// Saves every vCPU (they must be paused).
    pub(crate) fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmError> {
        self.vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if matches!(v.ctl.run_state(), RunState::Running) {
                    return Err(VmError::NotPaused);
                }
                let mut s = v.save()?;
                s.id = i as u32;
                Ok(s)
            })
            .collect()
    }

    /// Loads vCPU states (the vCPUs must be paused).
    pub(crate) fn restore_vcpus(&self, states: &[VcpuState]) -> Result<(), VmError> {
        if states.len() != self.vcpus.len() {
            return Err(VmError::State(state::StateError::WrongVcpuCount {
                found: states.len() as u32,
                expected: self.vcpus.len() as u32,
            }));
        }
        for (v, s) in self.vcpus.iter().zip(states) {
            if matches!(v.ctl.run_state(), RunState::Running) {
                return Err(VmError::NotPaused);
            }
            v.restore(s.clone())?;
        }
        Ok(())
    }

    /// The hook for a migration source: vCPU states and every device's stop-copy data. The
    /// vCPUs must be paused; devices end in STOP_COPY.
    pub(crate) fn snapshot_devices_and_vcpus(&self) -> Result<VmSnapshot, VmError> {
        let vcpus = state::encode(&self.save_vcpus()?);
        let map = |e: Errno| VmError::Device {
            what: "stop-copy",
            errno: e,
        };
        // Every P2P-capable device stops initiating DMA before any device stops; the one
        // device that may lack P2P stops first (`vfio::vmm::Source::stop_copy`).
        self.devices_to_p2p().map_err(map)?;
        let mut order: Vec<usize> = (0..self.devices.len()).collect();
        order.sort_by_key(|&i| has_p2p(&self.devices[i]));
        let mut devices = vec![(String::new(), Vec::new()); self.devices.len()];
        for i in order {
            let d = &self.devices[i];
            let stream = d.migration.set_state(vfio::MigState::StopCopy).map_err(map)?;
            let data = match stream {
                Some(s) => read_all(&s).map_err(map)?,
                None => return Err(VmError::Internal("no stop-copy stream")),
            };
            devices[i] = (d.name.clone(), data);
        }
        Ok(VmSnapshot { vcpus, devices })
    }

    /// The hook for a migration destination: loads a snapshot into this (paused, never run)
    /// VM. The devices are left in STOP; `resume_devices` and `resume` start everything.
    pub(crate) fn restore(&self, snap: &VmSnapshot) -> Result<(), VmError> {
        let states = state::decode(&snap.vcpus, self.vcpus.len() as u32).map_err(VmError::State)?;
        if snap.devices.len() != self.devices.len() {
            return Err(VmError::Config(format!(
                "snapshot has {} devices, this VM {}",
                snap.devices.len(),
                self.devices.len()
            )));
        }
        for (d, (_, data)) in self.devices.iter().zip(&snap.devices) {
            let map = |e: Errno| VmError::Device {
                what: "resume",
                errno: e,
            };
            let dev = &d.migration;
            dev.set_state(vfio::MigState::Stop).map_err(map)?;
            let s = dev
                .set_state(vfio::MigState::Resuming)
                .map_err(map)?
                .ok_or(VmError::Internal("no resume stream"))?;
            s.write(data).map_err(map)?;
            dev.set_state(vfio::MigState::Stop).map_err(map)?;
        }
        self.restore_vcpus(&states)
    }

    /// Every P2P-capable device to RUNNING_P2P (from STOP, or from RUNNING: it then accepts
    /// peer writes but starts none).
    fn devices_to_p2p(&self) -> Result<(), Errno> {
        for d in self.devices.iter().filter(|d| has_p2p(d)) {
            d.migration.set_state(vfio::MigState::RunningP2p)?;
        }
        Ok(())
    }

    /// Devices to RUNNING (after a restore or an aborted migration): all P2P-capable ones to
    /// RUNNING_P2P first, so that none initiates DMA towards a peer that is still stopped.
    pub fn resume_devices(&self) -> Result<(), VmError> {
        self.devices_to_p2p().map_err(|e| VmError::Device {
            what: "to RUNNING_P2P",
            errno: e,
        })?;
        for d in &self.devices {
            d.migration
                .set_state(vfio::MigState::Running)
                .map_err(|e| VmError::Device {
                    what: "to RUNNING",
                    errno: e,
                })?;
        }
        Ok(())
    }
}

fn has_p2p(d: &AttachedDevice) -> bool {
    d.migration.migration_flags().contains(vfio::MigFlags::P2P)
}

fn read_all(s: &vfio::DataStream) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}
