//! Compile errors of wrong handler signatures: each snippet is checked by `cargo check`
//! (offline, in a target directory of its own under `CARGO_TARGET_TMPDIR`) and its error
//! must name the argument or return type that is not accepted, in the words of the
//! `#[diagnostic::on_unimplemented]` attributes. Substrings, not whole outputs, so the test
//! holds across compiler versions.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A snippet: the body of `async fn add(router: &Router, broker: &MemoryBroker)`, and
/// what its error must say.
struct Case {
    name: &'static str,
    body: &'static str,
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "argument_not_an_extractor",
        body: r#"router.add_handler("h").subscribe(broker.subscriber(), "t")
            .handler(|n: u32, msg: Message| async move { let _ = (n, msg); })
            .await.unwrap();"#,
        expect: &[
            "`u32` cannot be an argument of a handler",
            "`u32` is not an extractor",
        ],
    },
    Case {
        name: "message_not_last",
        body: r#"router.add_handler("h").subscribe(broker.subscriber(), "t").state(1u8)
            .handler(|msg: Message, State(n): State<u8>| async move { let _ = (n, msg); })
            .await.unwrap();"#,
        expect: &[
            "Message` cannot be an argument of a handler",
            "may only be the last argument",
        ],
    },
    Case {
        name: "last_argument_not_an_extractor",
        body: r#"router.add_handler("h").subscribe(broker.subscriber(), "t")
            .handler(|n: std::time::Duration| async move { let _ = n; })
            .await.unwrap();"#,
        expect: &["`Duration` cannot be", "not an extractor"],
    },
    Case {
        name: "return_type_not_accepted",
        body: r#"router.add_handler("h").subscribe(broker.subscriber(), "t")
            .handler(|_msg: Message| async move { 42u32 })
            .await.unwrap();"#,
        expect: &["a handler cannot return `u32`"],
    },
    Case {
        name: "state_not_given",
        body: r#"#[derive(Clone)] struct Db;
            router.add_handler("h").subscribe(broker.subscriber(), "t")
            .handler(|State(_db): State<Db>, _msg: Message| async move {})
            .await.unwrap();"#,
        expect: &["`State<Db>` needs the handler's state to provide a `Db`, but the state is `()`"],
    },
    Case {
        name: "not_a_function",
        body: r#"router.add_handler("h").subscribe(broker.subscriber(), "t")
            .handler(42u8)
            .await.unwrap();"#,
        expect: &["`u8` is not a handler function"],
    },
];

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create dir");
    std::fs::write(path, text).expect("write file");
}

#[test]
fn wrong_handler_signatures_say_what_is_not_accepted() {
    let core = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace = core.parent().expect("core is in the workspace");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("diagnostics");
    let package = root.join("snippets");
    let mut manifest = format!(
        "[package]\nname = \"snippets\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [workspace]\n\n[dependencies]\ntidemill-core = {{ path = {:?} }}\n",
        core.display().to_string()
    );
    for case in CASES {
        manifest.push_str(&format!(
            "\n[[bin]]\nname = \"{0}\"\npath = \"src/{0}.rs\"\n",
            case.name
        ));
        write(
            &package.join(format!("src/{}.rs", case.name)),
            &format!(
                "#![allow(unused)]\nuse tidemill_core::extract::*;\n\
                 use tidemill_core::router::{{HandlerResult, Router}};\n\
                 use tidemill_core::{{MemoryBroker, Message}};\n\n\
                 async fn add(router: &Router, broker: &MemoryBroker) {{\n    {}\n}}\n\n\
                 fn main() {{}}\n",
                case.body
            ),
        );
    }
    write(&package.join("Cargo.toml"), &manifest);
    // The workspace's lock file pins the versions already on this machine.
    std::fs::copy(workspace.join("Cargo.lock"), package.join("Cargo.lock"))
        .expect("copy Cargo.lock");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["check", "--offline", "--bins", "--keep-going", "--quiet"])
        .arg("--message-format=short")
        .arg("--target-dir")
        .arg(root.join("target"))
        .current_dir(&package)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "every snippet must fail:\n{stderr}"
    );
    let mut problems = Vec::new();
    for case in CASES {
        let file = format!("src/{}.rs", case.name);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with(&file) && l.contains("error"))
            .collect();
        if errors.is_empty() {
            problems.push(format!("{}: no error reported", case.name));
            continue;
        }
        // Notes and labels come with the full format; the short one has the messages.
        let text = errors.join("\n");
        for want in case.expect {
            if !text.contains(want) && !full_error_mentions(&package, &root, case.name, want) {
                problems.push(format!("{}: expected {want:?} in:\n{text}", case.name));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// Whether the full (human) error output of one snippet mentions `want` (labels and notes
/// are not in the short format).
fn full_error_mentions(package: &Path, root: &Path, name: &str, want: &str) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["check", "--offline", "--quiet", "--bin", name])
        .arg("--target-dir")
        .arg(root.join("target"))
        .current_dir(package)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo check");
    String::from_utf8_lossy(&output.stderr).contains(want)
}
