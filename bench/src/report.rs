//! Writing a scenario's results: every sample as JSON, a Markdown table of percentiles,
//! and an SVG plot (latency CDF), under bench/results/<scenario>.*
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

/// What a scenario's samples measure: latencies in milliseconds (the default), or
/// another unit (a rate, bytes). Tables of other units also show the minimum, which for
/// a throughput is the worst sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Unit {
    /// Column suffix, e.g. `ms`, `datagrams/s`, `bytes`.
    pub symbol: &'static str,
    /// The plot's x axis, e.g. `latency (ms)`.
    pub axis: &'static str,
}

pub const MILLISECONDS: Unit = Unit {
    symbol: "ms",
    axis: "latency (ms)",
};

/// One measured quantity: its samples (milliseconds unless the report says otherwise).
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub n: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Series {
    pub fn summary(&self) -> Summary {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        Summary {
            name: self.name.clone(),
            n: s.len(),
            min_ms: s.first().copied().unwrap_or(f64::NAN),
            p50_ms: percentile(&s, 50.0),
            p90_ms: percentile(&s, 90.0),
            p99_ms: percentile(&s, 99.0),
            max_ms: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    scenario: &'a str,
    command: &'a str,
    machine: String,
    kernel: String,
    unix_time: u64,
    notes: &'a str,
    /// The unit of every `*_ms` field and sample below (`ms` unless said otherwise).
    unit: &'a str,
    summaries: Vec<Summary>,
    series: &'a [Series],
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

/// `bench/results/`, or `DEFIB_BENCH_RESULTS` (for smoke runs that must not overwrite
/// the committed results).
pub fn results_dir() -> PathBuf {
    match std::env::var_os("DEFIB_BENCH_RESULTS") {
        Some(dir) => PathBuf::from(dir),
        None => defib_tests::workspace_root().join("bench").join("results"),
    }
}

/// Writes `<dir>/<scenario>.json|.md|.svg` (latencies in ms) and returns the Markdown.
pub fn write(
    dir: &Path,
    scenario: &str,
    command: &str,
    notes: &str,
    series: &[Series],
) -> anyhow::Result<String> {
    write_in(dir, scenario, command, notes, MILLISECONDS, series)
}

/// [`write`] for samples in another unit.
pub fn write_in(
    dir: &Path,
    scenario: &str,
    command: &str,
    notes: &str,
    unit: Unit,
    series: &[Series],
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let summaries: Vec<Summary> = series.iter().map(Series::summary).collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let report = Report {
        scenario,
        command,
        machine: machine(),
        kernel: kernel.clone(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        notes,
        unit: unit.symbol,
        summaries: summaries.clone(),
        series,
    };
    std::fs::write(
        dir.join(format!("{scenario}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;

    let latency = unit.symbol == MILLISECONDS.symbol;
    let u = unit.symbol;
    let mut md = format!(
        "### {scenario}\n\n`{command}` on {} (kernel {kernel}).\n\n",
        report.machine
    );
    if latency {
        md.push_str(
            "| measure | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n",
        );
    } else {
        md.push_str(&format!(
            "| measure | n | min {u} | p50 {u} | p90 {u} | p99 {u} | max {u} |\n|---|---:|---:|---:|---:|---:|---:|\n"
        ));
    }
    for s in &summaries {
        if latency {
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                s.name, s.n, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            ));
        } else {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                s.name,
                s.n,
                big(s.min_ms),
                big(s.p50_ms),
                big(s.p90_ms),
                big(s.p99_ms),
                big(s.max_ms)
            ));
        }
    }
    if !notes.is_empty() {
        md.push_str(&format!("\n{notes}\n"));
    }
    md.push_str(&format!("\n![{scenario}](bench/results/{scenario}.svg)\n"));
    std::fs::write(dir.join(format!("{scenario}.md")), &md)?;
    plot_cdf(&dir.join(format!("{scenario}.svg")), scenario, unit, series)?;
    Ok(md)
}

/// A large figure with thousands separated by a thin space: `1 234 567`; a small one
/// (below 100, not whole) with three decimals: `0.427`.
pub fn big(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x.abs() < 100.0 && x.fract() != 0.0 {
        return format!("{x:.3}");
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Cumulative distribution of each series (x: the unit, y: share of samples ≤ x).
fn plot_cdf(path: &Path, title: &str, unit: Unit, series: &[Series]) -> anyhow::Result<()> {
    let max_x = series
        .iter()
        .flat_map(|s| s.samples_ms.iter().copied())
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.05;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: cumulative share of samples"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_x, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(unit.axis)
        .y_desc("share ≤ x")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let mut v = s.samples_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                color.stroke_width(2),
            ))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{big, percentile};

    #[test]
    fn nearest_rank_percentiles_of_one_to_hundred() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn big_numbers_get_thousands_separators() {
        assert_eq!(big(1_234_567.4), "1\u{202f}234\u{202f}567");
        assert_eq!(big(999.0), "999");
        assert_eq!(big(1000.0), "1\u{202f}000");
        assert_eq!(big(-12_345.0), "-12\u{202f}345");
    }
}
