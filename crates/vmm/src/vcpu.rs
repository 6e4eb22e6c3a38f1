//! vCPU threads: each runs `KVM_RUN` in a loop, dispatches exits, and parks when asked to
//! pause. While parked it serves commands (save or restore its state, resume, quit) on its
//! own thread, so no vCPU ioctl ever races with `KVM_RUN`.

use crate::dirty::CpuDirty;
use crate::kvm_sys;
use crate::mmio::MmioBus;
use crate::state::VcpuState;
use crate::VmError;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// MSRs saved and restored with a vCPU, where the host supports them.
pub const SAVED_MSRS: [u32; 12] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Why a vCPU stopped on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    Shutdown,
    FailEntry(u64),
    InternalError,
    Unexpected(String),
}

pub(crate) enum Cmd {
    Resume,
    Save(Sender<Result<VcpuState, VmError>>),
    Restore(Box<VcpuState>, Sender<Result<(), VmError>>),
    Quit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    Running,
    Parked,
    Stopped(VcpuStop),
}

pub(crate) struct VcpuCtl {
    pub pause: AtomicBool,
    pub state: Mutex<RunState>,
    pub cv: Condvar,
    pub cmds: Mutex<VecDeque<Cmd>>,
    pub exits: AtomicU64,
}

impl VcpuCtl {
    pub fn new() -> Self {
        Self {
            pause: AtomicBool::new(true),
            state: Mutex::new(RunState::Parked),
            cv: Condvar::new(),
            cmds: Mutex::new(VecDeque::new()),
            exits: AtomicU64::new(0),
        }
    }

    pub fn send(&self, c: Cmd) {
        self.cmds.lock().unwrap_or_else(|e| e.into_inner()).push_back(c);
        self.cv.notify_all();
    }

    pub fn run_state(&self) -> RunState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What a vCPU thread needs from its VM.
pub(crate) struct VcpuEnv {
    pub vm: Arc<VmFd>,
    pub bus: Arc<MmioBus>,
    pub dirty: Arc<CpuDirty>,
    /// Last byte a guest wrote to port 0x510 (a debugging aid for guest programs).
    pub port_signal: Arc<AtomicU64>,
}

pub(crate) fn run(mut vcpu: VcpuFd, id: usize, env: VcpuEnv, ctl: Arc<VcpuCtl>) {
    loop {
        if ctl.pause.load(Ordering::Acquire) {
            if !serve_parked(&mut vcpu, &ctl, RunState::Parked) {
                return;
            }
            continue;
        }
        let stop = match vcpu.run() {
            Ok(exit) => {
                ctl.exits.fetch_add(1, Ordering::Relaxed);
                match exit {
                    VcpuExit::MmioRead(addr, data) => {
                        env.bus.read(addr, data);
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        env.bus.write(addr, data);
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        if port == 0x510 {
                            env.port_signal
                                .store(data.first().copied().unwrap_or(0) as u64, Ordering::Relaxed);
                        }
                        None
                    }
                    VcpuExit::IoIn(_, data) => {
                        data.fill(0xff);
                        None
                    }
                    VcpuExit::Unsupported(r) if r == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL => {
                        env.dirty.ring_full(&env.vm, id);
                        None
                    }
                    VcpuExit::Hlt | VcpuExit::Intr => None,
                    VcpuExit::Shutdown => Some(VcpuStop::Shutdown),
                    VcpuExit::FailEntry(reason, _) => Some(VcpuStop::FailEntry(reason)),
                    VcpuExit::InternalError => Some(VcpuStop::InternalError),
                    other => Some(VcpuStop::Unexpected(format!("{other:?}"))),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuStop::Unexpected(format!("KVM_RUN: {e}"))),
        };
        if let Some(stop) = stop {
            if !serve_parked(&mut vcpu, &ctl, RunState::Stopped(stop)) {
                return;
            }
        }
    }
}

/// Parks, serving commands until a resume (true) or quit (false).
fn serve_parked(vcpu: &mut VcpuFd, ctl: &VcpuCtl, state: RunState) -> bool {
    let stopped = matches!(state, RunState::Stopped(_));
    *ctl.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    ctl.cv.notify_all();
    loop {
        let cmd = {
            let mut q = ctl.cmds.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(c) = q.pop_front() {
                    break c;
                }
                q = ctl.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        match cmd {
            Cmd::Resume if stopped => {}
            Cmd::Resume => {
                ctl.pause.store(false, Ordering::Release);
                *ctl.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Running;
                ctl.cv.notify_all();
                return true;
            }
            Cmd::Save(tx) => {
                let _ = tx.send(save(vcpu));
            }
            Cmd::Restore(s, tx) => {
                let _ = tx.send(restore(vcpu, &s));
            }
            Cmd::Quit => return false,
        }
    }
}

fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm { op, errno: e.errno() }
}

pub(crate) fn save(vcpu: &VcpuFd) -> Result<VcpuState, VmError> {
    let mut msrs = Msrs::from_entries(&SAVED_MSRS.map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    }))
    .map_err(|_| VmError::Internal("MSR list"))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    Ok(VcpuState {
        id: 0,
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: zerocopy::IntoBytes::as_bytes(&vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?).to_vec(),
        xcrs: vcpu.get_xcrs().ok(),
        msrs: msrs.as_slice()[..n].to_vec(),
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
    })
}

pub(crate) fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VmError> {
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    let xsave = <kvm_bindings::kvm_xsave as zerocopy::FromBytes>::read_from_bytes(&s.xsave).map_err(|_| {
        VmError::State(crate::state::StateError::BadRecord {
            vcpu: s.id,
            kind: 3,
            len: s.xsave.len() as u32,
        })
    })?;
    kvm_sys::set_xsave(vcpu, &xsave).map_err(kvm("KVM_SET_XSAVE"))?;
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    vcpu.set_debug_regs(&s.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VmError::Internal("MSR list"))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(VmError::Kvm {
            op: "KVM_SET_MSRS (partial)",
            errno: libc::EINVAL,
        });
    }
    vcpu.set_vcpu_events(&s.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(s.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// A vCPU seen from the VM: its control block and its thread.
pub(crate) struct VcpuHandle {
    pub ctl: Arc<VcpuCtl>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl VcpuHandle {
    fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        if let Some(t) = &self.thread {
            let _ = t.kill(kvm_sys::kick_signal());
        }
    }

    /// Asks for a pause and kicks until the thread parks; `Err` after `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        self.ctl.pause.store(true, Ordering::Release);
        let end = Instant::now() + timeout;
        loop {
            if !matches!(self.ctl.run_state(), RunState::Running) {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(VmError::PauseTimeout);
            }
            self.ctl.pause.store(true, Ordering::Release);
            self.kick();
            let g = self.ctl.state.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self.ctl.cv.wait_timeout(g, Duration::from_micros(50));
        }
    }

    /// Asks the thread to run again and waits until it has taken the command.
    pub fn resume(&self, timeout: Duration) -> Result<(), VmError> {
        // A resume queued for a running vCPU would be served at its next pause and clear
        // the pause flag, un-pausing it behind the caller's back.
        if self.ctl.run_state() == RunState::Running {
            return Ok(());
        }
        self.ctl.send(Cmd::Resume);
        let end = Instant::now() + timeout;
        let mut g = self.ctl.state.lock().unwrap_or_else(|e| e.into_inner());
        while *g == RunState::Parked {
            let now = Instant::now();
            if now > end {
                return Err(VmError::ResumeTimeout);
            }
            g = self
                .ctl
                .cv
                .wait_timeout(g, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    pub fn save(&self) -> Result<VcpuState, VmError> {
        let (tx, rx) = channel();
        self.ctl.send(Cmd::Save(tx));
        rx.recv().map_err(|_| VmError::Internal("vCPU thread gone"))?
    }

    pub fn restore(&self, s: VcpuState) -> Result<(), VmError> {
        let (tx, rx) = channel();
        self.ctl.send(Cmd::Restore(Box::new(s), tx));
        rx.recv().map_err(|_| VmError::Internal("vCPU thread gone"))?
    }

    pub fn quit(&mut self) {
        self.ctl.pause.store(true, Ordering::Release);
        let _ = self.pause(Duration::from_secs(2));
        self.ctl.send(Cmd::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
