//! The VMM side: drives a set of devices through QEMU's sequence (`docs/vfio.md#vmm-side`;
//! QEMU: hw/vfio/migration.c). The migration engine moves the framed bytes; this module
//! decides the states, reads and writes the data streams and frames them (see `stream.rs`).

use crate::device::{DataStream, MigrationDevice};
use crate::state::{MigFlags, MigState};
use crate::stream::{Decoder, Record, StreamError};
use iommu::errno::{ENODEV, ENOMSG};
use iommu::Errno;
use thiserror::Error;

/// QEMU's read buffer: `min(1 MiB, stop_copy_length)` per read.
pub const MAX_CHUNK: u64 = 1 << 20;
/// What QEMU assumes when MIG_DATA_SIZE fails, so migration cannot complete by accident.
pub const UNKNOWN_STOP_COPY_SIZE: u64 = 100 << 30;

/// A device's part of the migration failed.
#[derive(Debug, Error)]
pub enum VfioMigError {
    #[error("{device}: {op} failed")]
    Device {
        device: String,
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("{device}: malformed migration stream")]
    Stream {
        device: String,
        #[source]
        source: StreamError,
    },
    #[error("{device}: {what}")]
    Protocol { device: String, what: String },
}

impl VfioMigError {
    /// The errno behind the failure, if a device reported one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            VfioMigError::Device { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn dev_err<'a>(dev: &'a MigrationDevice, op: &'static str) -> impl FnOnce(Errno) -> VfioMigError + 'a {
    move |errno| VfioMigError::Device {
        device: dev.name().to_string(),
        op,
        errno,
    }
}

/// Bytes of framed data for device number `.0`.
pub type Section = (usize, Vec<u8>);

struct SrcDev {
    dev: MigrationDevice,
    flags: MigFlags,
    stream: Option<DataStream>,
    init_sent: bool,
    chunk: u64,
}

/// Pending data, as QEMU's `state_pending_estimate` / `state_pending_exact` see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// `initial_bytes + dirty_bytes` of every pre-copy device.
    pub estimate: u64,
    /// The estimate plus every device's `stop_copy_length` (100 GiB if unknown).
    pub exact: u64,
}

/// The source side of a set of devices.
pub struct Source {
    devs: Vec<SrcDev>,
}

impl Source {
    pub fn new(devices: Vec<MigrationDevice>) -> Self {
        Self {
            devs: devices
                .into_iter()
                .map(|dev| SrcDev {
                    flags: dev.migration_flags(),
                    dev,
                    stream: None,
                    init_sent: false,
                    chunk: MAX_CHUNK,
                })
                .collect(),
        }
    }

    pub fn devices(&self) -> impl Iterator<Item = &MigrationDevice> {
        self.devs.iter().map(|d| &d.dev)
    }

    /// Whether the destination must acknowledge initial data before switchover (some device
    /// does pre-copy).
    pub fn needs_switchover_ack(&self) -> bool {
        self.devs
            .iter()
            .any(|d| d.stream.is_some() && d.dev.get_state().is_precopy())
    }

    /// `save_setup`: a running PRE_COPY device enters PRE_COPY. Returns the setup sections.
    pub fn setup(&mut self) -> Result<Vec<Section>, VfioMigError> {
        let mut out = Vec::new();
        for (i, d) in self.devs.iter_mut().enumerate() {
            if d.flags.contains(MigFlags::PRE_COPY) && d.dev.get_state() == MigState::Running {
                d.stream = d
                    .dev
                    .set_state(MigState::PreCopy)
                    .map_err(dev_err(&d.dev, "RUNNING -> PRE_COPY"))?;
            }
            d.chunk = d.dev.mig_data_size().unwrap_or(MAX_CHUNK).clamp(1, MAX_CHUNK);
            let mut b = Vec::new();
            Record::Setup.encode(&mut b);
            Record::EndOfState.encode(&mut b);
            out.push((i, b));
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(out)
    }

    /// Pending data now.
    pub fn pending(&self) -> Pending {
        let mut p = Pending::default();
        for d in &self.devs {
            if let Some(s) = &d.stream {
                if let Ok(info) = s.precopy_info() {
                    p.estimate += info.initial_bytes + info.dirty_bytes;
                }
            }
            p.exact += d.dev.mig_data_size().unwrap_or(UNKNOWN_STOP_COPY_SIZE);
        }
        p.exact += p.estimate;
        p
    }

    /// `save_live_iterate`: one block of pre-copy data per device. Returns the sections and
    /// whether no device has pre-copy data left.
    pub fn iterate(&mut self) -> Result<(Vec<Section>, bool), VfioMigError> {
        let mut out = Vec::new();
        let mut all_done = true;
        for (i, d) in self.devs.iter_mut().enumerate() {
            let Some(s) = &d.stream else { continue };
            let info = s.precopy_info().map_err(dev_err(&d.dev, "PRECOPY_INFO"))?;
            let mut b = Vec::new();
            if info.initial_bytes + info.dirty_bytes > 0 {
                let mut buf = vec![0u8; d.chunk as usize];
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        Record::Data(buf).encode(&mut b);
                    }
                    Ok(_) => {}
                    Err(e) if e == ENOMSG => {}
                    Err(e) => return Err(dev_err(&d.dev, "pre-copy read")(e)),
                }
            }
            let after = s.precopy_info().map_err(dev_err(&d.dev, "PRECOPY_INFO"))?;
            if !d.init_sent && after.initial_bytes == 0 {
                Record::InitDataSent.encode(&mut b);
                d.init_sent = true;
            }
            all_done &= after.initial_bytes == 0 && after.dirty_bytes == 0;
            Record::EndOfState.encode(&mut b);
            out.push((i, b));
        }
        Ok((out, all_done))
    }

    /// Whether every pre-copy device has sent INIT_DATA_SENT.
    pub fn initial_data_sent(&self) -> bool {
        self.devs.iter().all(|d| d.stream.is_none() || d.init_sent)
    }

    /// Switchover, first step: every P2P-capable device moves to RUNNING_P2P or
    /// PRE_COPY_P2P before any device stops.
    pub fn enter_p2p(&mut self) -> Result<(), VfioMigError> {
        for d in &self.devs {
            if !d.flags.contains(MigFlags::P2P) {
                continue;
            }
            let target = if d.dev.get_state().is_precopy() {
                MigState::PreCopyP2p
            } else {
                MigState::RunningP2p
            };
            d.dev.set_state(target).map_err(dev_err(&d.dev, "enter P2P"))?;
        }
        Ok(())
    }

    /// `save_live_complete_precopy`: STOP_COPY (fallback STOP) and the stream read to EOF,
    /// then the config section. Returns the sections.
    ///
    /// A device without P2P stops first (a VM has at most one): until then it may still write
    /// to its peers, which are in RUNNING_P2P and accept those writes; once it is stopped
    /// nothing initiates DMA and the others can stop in any order.
    pub fn stop_copy(&mut self) -> Result<Vec<Section>, VfioMigError> {
        let mut order: Vec<usize> = (0..self.devs.len()).collect();
        order.sort_by_key(|&i| self.devs[i].flags.contains(MigFlags::P2P));
        order.into_iter().map(|i| self.stop_copy_one(i)).collect()
    }

    /// STOP_COPY (fallback STOP) of device `i` alone, its stream read to EOF, then its config
    /// section. [`Source::stop_copy`] is the order that loses no peer write; this is for a
    /// caller that must order the stops itself (and for tests that break that order).
    pub fn stop_copy_one(&mut self, i: usize) -> Result<Section, VfioMigError> {
        let Some(d) = self.devs.get_mut(i) else {
            return Err(VfioMigError::Protocol {
                device: format!("#{i}"),
                what: "no such device".into(),
            });
        };
        match d.dev.set_state(MigState::StopCopy) {
            Ok(Some(s)) => d.stream = Some(s),
            Ok(None) => {}
            Err(e) => {
                d.dev
                    .set_state(MigState::Stop)
                    .map_err(|_| dev_err(&d.dev, "STOP_COPY")(e))?;
                d.stream = None;
            }
        }
        let mut b = Vec::new();
        if let Some(s) = &d.stream {
            let mut buf = vec![0u8; d.chunk as usize];
            loop {
                let n = s.read(&mut buf).map_err(dev_err(&d.dev, "stop-copy read"))?;
                if n == 0 {
                    break;
                }
                Record::Data(buf[..n].to_vec()).encode(&mut b);
            }
        }
        Record::EndOfState.encode(&mut b);
        Record::Config(format!("{}:{}", d.dev.name(), d.flags).into_bytes()).encode(&mut b);
        Record::EndOfState.encode(&mut b);
        Ok((i, b))
    }

    /// `save_cleanup` after a successful migration: STOP_COPY → STOP, outside the downtime.
    pub fn complete(&mut self) {
        for d in &mut self.devs {
            d.stream = None;
            if d.dev.get_state() == MigState::StopCopy {
                let _ = d.dev.set_state(MigState::Stop);
            }
        }
    }

    /// On failure: every device back to RUNNING (a reset where the transition fails), the
    /// P2P-capable ones through RUNNING_P2P first, so that none initiates DMA towards a peer
    /// that is still stopped.
    pub fn abort(&mut self) {
        for d in &mut self.devs {
            d.stream = None;
            d.init_sent = false;
            if d.flags.contains(MigFlags::P2P) && !d.dev.get_state().is_precopy() {
                let _ = d.dev.set_state(MigState::RunningP2p);
            }
        }
        for d in &mut self.devs {
            if d.dev.set_state(MigState::Running).is_err() || d.dev.get_state() != MigState::Running {
                d.dev.reset();
            }
        }
    }
}

/// Something the destination tells the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestEvent {
    /// Device `.0` received all its initial pre-copy data.
    InitDataReceived(usize),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Any,
    /// A SETUP or CONFIG record must be followed by END_OF_STATE.
    End,
}

struct DstDev {
    dev: MigrationDevice,
    stream: Option<DataStream>,
    dec: Decoder,
    expect: Expect,
    init_data: bool,
    config: Option<Vec<u8>>,
}

/// The destination side of a set of devices.
pub struct Destination {
    devs: Vec<DstDev>,
}

impl Destination {
    pub fn new(devices: Vec<MigrationDevice>) -> Self {
        Self {
            devs: devices
                .into_iter()
                .map(|dev| DstDev {
                    dev,
                    stream: None,
                    dec: Decoder::new(),
                    expect: Expect::Any,
                    init_data: false,
                    config: None,
                })
                .collect(),
        }
    }

    pub fn devices(&self) -> impl Iterator<Item = &MigrationDevice> {
        self.devs.iter().map(|d| &d.dev)
    }

    /// `load_setup`: every device enters RESUMING.
    pub fn setup(&mut self) -> Result<(), VfioMigError> {
        for d in &mut self.devs {
            d.stream = d
                .dev
                .set_state(MigState::Resuming)
                .map_err(dev_err(&d.dev, "STOP -> RESUMING"))?;
        }
        Ok(())
    }

    /// `load_state`: decodes framed bytes for device `idx`, writes data to its stream.
    pub fn load(&mut self, idx: usize, bytes: &[u8]) -> Result<Vec<DestEvent>, VfioMigError> {
        let Some(d) = self.devs.get_mut(idx) else {
            return Err(VfioMigError::Protocol {
                device: format!("#{idx}"),
                what: "no such device".into(),
            });
        };
        let name = d.dev.name().to_string();
        d.dec.feed(bytes);
        let mut events = Vec::new();
        loop {
            let rec = d.dec.next_record().map_err(|source| VfioMigError::Stream {
                device: name.clone(),
                source,
            })?;
            let Some(rec) = rec else { break };
            if d.expect == Expect::End && rec != Record::EndOfState {
                return Err(VfioMigError::Protocol {
                    device: name,
                    what: "missing END_OF_STATE".into(),
                });
            }
            match rec {
                Record::EndOfState => d.expect = Expect::Any,
                Record::Setup => d.expect = Expect::End,
                Record::Config(c) => {
                    d.config = Some(c);
                    d.expect = Expect::End;
                }
                Record::Data(bytes) => {
                    let Some(s) = &d.stream else {
                        return Err(VfioMigError::Protocol {
                            device: name,
                            what: "data while not RESUMING".into(),
                        });
                    };
                    let mut off = 0;
                    while off < bytes.len() {
                        let n = s.write(&bytes[off..]).map_err(dev_err(&d.dev, "resume write"))?;
                        if n == 0 {
                            return Err(dev_err(&d.dev, "resume write")(Errno::new(
                                ENODEV,
                                "device took no bytes",
                            )));
                        }
                        off += n;
                    }
                }
                Record::InitDataSent => {
                    if !d.dev.migration_flags().contains(MigFlags::PRE_COPY) {
                        return Err(VfioMigError::Protocol {
                            device: name,
                            what: "INIT_DATA_SENT from a device without PRE_COPY".into(),
                        });
                    }
                    d.init_data = true;
                    events.push(DestEvent::InitDataReceived(idx));
                }
            }
        }
        Ok(events)
    }

    /// Whether every PRE_COPY-capable device has received its initial data.
    pub fn init_data_received(&self) -> bool {
        self.devs
            .iter()
            .all(|d| d.init_data || !d.dev.migration_flags().contains(MigFlags::PRE_COPY))
    }

    /// RESUMING → STOP: the devices consume and validate the data here.
    pub fn finish(&mut self) -> Result<(), VfioMigError> {
        for d in &mut self.devs {
            if d.dec.pending() != 0 {
                return Err(VfioMigError::Protocol {
                    device: d.dev.name().into(),
                    what: "truncated record at the end of the stream".into(),
                });
            }
            d.dev
                .set_state(MigState::Stop)
                .map_err(dev_err(&d.dev, "RESUMING -> STOP"))?;
            d.stream = None;
        }
        Ok(())
    }

    /// VM start: RUNNING_P2P for every device, then RUNNING.
    pub fn start(&mut self) -> Result<(), VfioMigError> {
        for d in &self.devs {
            if d.dev.migration_flags().contains(MigFlags::P2P) {
                d.dev
                    .set_state(MigState::RunningP2p)
                    .map_err(dev_err(&d.dev, "STOP -> RUNNING_P2P"))?;
            }
        }
        for d in &self.devs {
            d.dev
                .set_state(MigState::Running)
                .map_err(dev_err(&d.dev, "-> RUNNING"))?;
        }
        Ok(())
    }

    /// Abandons an incoming migration: devices are reset.
    pub fn abort(&mut self) {
        for d in &mut self.devs {
            d.stream = None;
            d.dev.reset();
        }
    }
}
