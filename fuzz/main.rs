//! `livemig-fuzz TARGET`: one of `fuzzing::TARGETS` under AFL++ (persistent mode). A panic
//! aborts the process, which AFL++ records as a crash.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(t) = fuzzing::target(&name) else {
        eprintln!("usage: livemig-fuzz TARGET; targets:");
        for t in fuzzing::TARGETS {
            eprintln!("  {}", t.name);
        }
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| {
        (t.run)(data);
    });
}
