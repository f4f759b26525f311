//! Writing a scenario's results: every sample as JSON, a Markdown table of percentiles,
//! and an SVG plot (latency CDF), under bench/results/<scenario>.*
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

/// One measured quantity: its samples in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub n: usize,
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

pub fn results_dir() -> PathBuf {
    defib_tests::workspace_root().join("bench").join("results")
}

/// Writes `<dir>/<scenario>.json|.md|.svg` and returns the Markdown.
pub fn write(
    dir: &Path,
    scenario: &str,
    command: &str,
    notes: &str,
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
        summaries: summaries.clone(),
        series,
    };
    std::fs::write(
        dir.join(format!("{scenario}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;

    let mut md = format!(
        "### {scenario}\n\n`{command}` on {} (kernel {kernel}).\n\n| measure | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n",
        report.machine
    );
    for s in &summaries {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            s.name, s.n, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
        ));
    }
    if !notes.is_empty() {
        md.push_str(&format!("\n{notes}\n"));
    }
    md.push_str(&format!("\n![{scenario}](bench/results/{scenario}.svg)\n"));
    std::fs::write(dir.join(format!("{scenario}.md")), &md)?;
    plot_cdf(&dir.join(format!("{scenario}.svg")), scenario, series)?;
    Ok(md)
}

/// Cumulative distribution of each series (x: ms, y: share of samples ≤ x).
fn plot_cdf(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
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
        .x_desc("latency (ms)")
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
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles_of_one_to_hundred() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
