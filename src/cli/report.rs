//! The benchmark's files: every figure as JSON or CSV, and time and GFLOP/s against sequence
//! length as an SVG plot.

use std::path::Path;

use plotters::prelude::*;

use wgpu_attention::Stage;

use super::CliError;
use super::bench::{BenchArgs, Report};

/// Writes whichever of `--json`, `--csv` and `--plot` were asked for.
pub fn write(report: &Report, args: &BenchArgs) -> Result<(), CliError> {
    if let Some(path) = &args.json {
        let file = create(path)?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), report).map_err(|e| {
            CliError::File {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    }
    if let Some(path) = &args.csv {
        write_csv(report, path).map_err(|e| CliError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    if let Some(path) = &args.plot {
        plot(report, path).map_err(|e| CliError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn create(path: &Path) -> Result<std::fs::File, CliError> {
    std::fs::File::create(path).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_csv(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut w = csv::Writer::from_path(path)?;
    let mut header: Vec<String> = ["seq", "path", "adapter", "timing"]
        .map(String::from)
        .to_vec();
    // A column per stage any plan can run, so staged and fused rows line up.
    header.extend(Stage::ALL.iter().map(|s| format!("{s} ms")));
    header.extend(
        [
            "attention ms",
            "attention min ms",
            "gpu ms",
            "gpu min ms",
            "end to end ms",
            "end to end min ms",
            "attention GFLOP/s",
            "layer GFLOP/s",
            "max abs err",
            "tolerance used",
            "gpu memory bytes",
            "samples",
        ]
        .map(String::from),
    );
    w.write_record(&header)?;
    let ms = |s: f64| format!("{:.6}", s * 1e3);
    for row in &report.gpu {
        let mut record = vec![
            row.seq.to_string(),
            row.kernel.to_string(),
            report.adapter.clone(),
            report.timing.to_string(),
        ];
        record.extend(Stage::ALL.iter().map(|stage| {
            row.stages
                .iter()
                .find(|(s, _)| *s == stage.label())
                .map_or(String::new(), |(_, t)| ms(t.median))
        }));
        record.extend([
            ms(row.attention.median),
            ms(row.attention.min),
            ms(row.gpu.median),
            ms(row.gpu.min),
            ms(row.end_to_end.median),
            ms(row.end_to_end.min),
            format!("{:.3}", row.attention_gflops),
            format!("{:.3}", row.layer_gflops),
            format!("{:e}", row.error.max_abs),
            format!("{:.4}", row.error.tolerance_used),
            row.memory_bytes.to_string(),
            report.repeats.to_string(),
        ]);
        w.write_record(&record)?;
    }
    for row in &report.cpu {
        let mut record = vec![
            row.seq.to_string(),
            "cpu".to_string(),
            format!("{} threads", row.threads),
            "wall clock".to_string(),
        ];
        record.extend(Stage::ALL.iter().map(|_| String::new()));
        // The GPU-only columns (gpu time, memory) stay empty: a CPU row has no such figure.
        record.extend([
            ms(row.attention.median),
            ms(row.attention.min),
            String::new(),
            String::new(),
            ms(row.layer.median),
            ms(row.layer.min),
            format!("{:.3}", row.attention_gflops),
            format!("{:.3}", row.layer_gflops),
            format!("{:e}", row.error.max_abs),
            format!("{:.4}", row.error.tolerance_used),
            String::new(),
            row.samples.to_string(),
        ]);
        w.write_record(&record)?;
    }
    w.flush()?;
    Ok(())
}

/// Tableau's ten colours: distinct on white, and in print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of the plot: a label and (seq, value) points.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

fn plot(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut times = Vec::new();
    let mut rates = Vec::new();
    let mut kernels: Vec<&str> = Vec::new();
    for row in &report.gpu {
        if !kernels.contains(&row.kernel) {
            kernels.push(row.kernel);
        }
    }
    for &kernel in &kernels {
        let rows: Vec<_> = report.gpu.iter().filter(|r| r.kernel == kernel).collect();
        let stages: Vec<&str> = rows
            .first()
            .map(|r| r.stages.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default();
        for stage in stages {
            times.push(Series {
                label: format!("{kernel}: {stage}"),
                points: rows
                    .iter()
                    .filter_map(|r| {
                        let t = r.stages.iter().find(|(s, _)| *s == stage)?.1.median;
                        Some((r.seq as f64, t * 1e3))
                    })
                    .collect(),
            });
        }
        rates.push(Series {
            label: format!("{kernel}: attention"),
            points: rows
                .iter()
                .map(|r| (r.seq as f64, r.attention_gflops))
                .collect(),
        });
        rates.push(Series {
            label: format!("{kernel}: layer"),
            points: rows
                .iter()
                .map(|r| (r.seq as f64, r.layer_gflops))
                .collect(),
        });
    }
    if !report.cpu.is_empty() {
        let cpu = |f: fn(&super::bench::CpuRow) -> f64| -> Vec<(f64, f64)> {
            report.cpu.iter().map(|r| (r.seq as f64, f(r))).collect()
        };
        times.push(Series {
            label: "cpu: layer".into(),
            points: cpu(|r| r.layer.median * 1e3),
        });
        times.push(Series {
            label: "cpu: attention".into(),
            points: cpu(|r| r.attention.median * 1e3),
        });
        rates.push(Series {
            label: "cpu: attention".into(),
            points: cpu(|r| r.attention_gflops),
        });
        rates.push(Series {
            label: "cpu: layer".into(),
            points: cpu(|r| r.layer_gflops),
        });
    }

    let root = SVGBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} ({}), batch {}, heads {}, head_dim {}{}",
        report.adapter,
        report.backend,
        report.batch,
        report.heads,
        report.head_dim,
        if report.causal { ", causal" } else { "" }
    );
    let (top, body) = root.split_vertically(36);
    top.titled(&title, ("sans-serif", 18))?;
    let (left, right) = body.split_horizontally(640);
    // Times rise to the right, leaving the lower right empty; rates sit in bands (GPU and CPU
    // far apart), leaving room at mid height.
    draw_panel(
        &left,
        "time per call (ms, median)",
        "ms",
        &times,
        SeriesLabelPosition::LowerRight,
    )?;
    draw_panel(
        &right,
        "throughput (GFLOP/s, median)",
        "GFLOP/s",
        &rates,
        SeriesLabelPosition::MiddleRight,
    )?;
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    series: &[Series],
    legend: SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>> {
    // Sequence lengths double, so x is drawn as log2(seq) and labelled with seq itself.
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| {
            let points = s
                .points
                .iter()
                .filter(|(x, y)| positive(*x) && positive(*y))
                .map(|&(x, y)| (x.log2(), y))
                .collect();
            (s.label.as_str(), points)
        })
        .collect();
    let all = || lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (6.0, 7.0, 1.0, 2.0);
    }
    let ticks = (x1 - x0).round() as usize + 1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0 - 0.25..x1 + 0.25, (y0 / 1.5..y1 * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(ticks)
        .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
        .y_label_formatter(&|y| format!("{y}"))
        .x_desc("sequence length")
        .y_desc(unit)
        .draw()?;
    for (i, (label, points)) in lines.into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
