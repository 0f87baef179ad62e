//! Turns the rows `make bench` gathered (JSON lines, see `tidemill_testkit::bench`) into the
//! Markdown of BENCHMARKS.md on stdout.
//!
//! Usage: `bench-report REPORT.jsonl COMMAND` (COMMAND is quoted in the page).

use std::process::{Command, ExitCode};

use tidemill_testkit::bench::Row;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), command) = (args.next(), args.next()) else {
        eprintln!("usage: bench-report REPORT.jsonl [COMMAND]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench-report: cannot read {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rows = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Row>(line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("bench-report: {path} line {}: {e}", n + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    print!(
        "{}",
        render(&rows, command.as_deref().unwrap_or("make bench"))
    );
    ExitCode::SUCCESS
}

fn render(rows: &[Row], command: &str) -> String {
    let mut out = String::new();
    out.push_str("# Tidemill benchmarks\n\n");
    out.push_str(&format!(
        "Written by `{command}` on {}. Each group compares Tidemill with its baseline (the raw \
         client crate on the same broker with the same settings, or the plain router for the \
         in-memory scenarios) in the same run; ratios are Tidemill ÷ baseline, so ≥ 1 is \
         faster for msg/s and more memory for RSS. Peak RSS is the process's `VmHWM` reset \
         before each scenario. Benchmarks are not part of `make test`.\n\n",
        shell("date -u '+%Y-%m-%d %H:%M UTC'")
    ));
    out.push_str("## Machine\n\n");
    out.push_str(&format!(
        "- CPU: {} ({} cores)\n",
        cpu_model(),
        shell("nproc")
    ));
    out.push_str(&format!(
        "- Memory: {}\n",
        shell("free -h | awk '/^Mem:/{print $2}'")
    ));
    out.push_str(&format!("- Kernel: {}\n", shell("uname -sr")));
    out.push_str(&format!("- Rust: {}\n", shell("rustc -V")));
    out.push_str(&format!(
        "- Load before the run: {}\n\n",
        shell("cut -d' ' -f1-3 /proc/loadavg")
    ));
    out.push_str("## Results\n\n");
    out.push_str("| scenario | variant | msg/s | ratio | peak RSS | RSS ratio | note |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---|\n");
    // Groups in the order their first row was recorded.
    let mut groups: Vec<(&str, Vec<&Row>)> = Vec::new();
    for row in rows {
        match groups.iter_mut().find(|(group, _)| *group == row.group) {
            Some((_, members)) => members.push(row),
            None => groups.push((&row.group, vec![row])),
        }
    }
    for (group, members) in &groups {
        let base = members[0];
        for row in members {
            let ratio = if std::ptr::eq(*row, base) {
                "baseline".to_string()
            } else {
                format!("{:.2}×", row.msgs_per_sec / base.msgs_per_sec)
            };
            let rss = row
                .peak_rss_bytes
                .map_or("–".to_string(), |b| format!("{:.1} MiB", mib(b)));
            let rss_ratio = match (row.peak_rss_bytes, base.peak_rss_bytes) {
                _ if std::ptr::eq(*row, base) => "".to_string(),
                (Some(a), Some(b)) if b > 0 => format!("{:.2}×", a as f64 / b as f64),
                _ => "–".to_string(),
            };
            out.push_str(&format!(
                "| {group} | {} | {} | {ratio} | {rss} | {rss_ratio} | {} |\n",
                row.variant,
                thousands(row.msgs_per_sec),
                row.note.as_deref().unwrap_or("")
            ));
        }
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_against_the_first_variant_of_each_group() {
        let rows = vec![
            Row::new("kafka publish", "raw rdkafka", 100_000.0).with_peak_rss(Some(10 << 20)),
            Row::new("kafka publish", "tidemill", 95_000.0).with_peak_rss(Some(12 << 20)),
            Row::new("router", "plain", 1_200_000.0).with_note("N = 1,000,000"),
        ];
        let page = render(&rows, "make bench");
        assert!(
            page.contains("| kafka publish | raw rdkafka | 100,000 | baseline | 10.0 MiB |  |"),
            "{page}"
        );
        assert!(
            page.contains("| kafka publish | tidemill | 95,000 | 0.95× | 12.0 MiB | 1.20× |"),
            "{page}"
        );
        assert!(
            page.contains("| router | plain | 1,200,000 | baseline | – |  | N = 1,000,000 |"),
            "{page}"
        );
    }
}
