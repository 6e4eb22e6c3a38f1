//! `fuzz-targets --list`: the target names, one per line. `fuzz-targets TARGET FILE...`: runs
//! a target on each file without AFL++, and says what it made of it: how a crash found by
//! the fuzzer is reproduced under a debugger or a test.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "--list" => {
            for t in fuzzing::TARGETS {
                println!("{}", t.name);
            }
            ExitCode::SUCCESS
        }
        [flag] if flag == "--describe" => {
            for t in fuzzing::TARGETS {
                println!("{}: {}", t.name, t.what);
            }
            ExitCode::SUCCESS
        }
        [name, files @ ..] if !files.is_empty() => {
            let Some(t) = fuzzing::target(name) else {
                eprintln!("no fuzz target '{name}' (--list names them)");
                return ExitCode::from(2);
            };
            for f in files {
                match std::fs::read(f) {
                    Ok(data) => println!("{f}: {:?}", (t.run)(&data)),
                    Err(e) => {
                        eprintln!("{f}: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: fuzz-targets --list | --describe | TARGET FILE...");
            ExitCode::from(2)
        }
    }
}
