//! Merges result files into a Markdown table, a JSON summary and a chart.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use crate::results::RunResult;

#[derive(Args)]
pub struct ReportArgs {
    /// Directory with SERVER-SCENARIO.json result files.
    #[arg(long, default_value = "bench/results")]
    pub dir: PathBuf,
    /// Servers in column order (default: every server with results).
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Where to write summary.md, summary.json and chart.png (default: --dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Serialize, Default, Clone)]
struct ServerSummary {
    server: String,
    load: Option<RunResult>,
    offline: Option<RunResult>,
}

fn read(path: &Path) -> Option<RunResult> {
    let s = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&s) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("skipping {}: {e}", path.display());
            None
        }
    }
}

pub fn report(a: &ReportArgs) -> Result<()> {
    let mut servers = a.servers.clone();
    if servers.is_empty() {
        for e in std::fs::read_dir(&a.dir).with_context(|| format!("read {}", a.dir.display()))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = name.strip_suffix("-load.json").or_else(|| name.strip_suffix("-offline.json"))
                && !servers.iter().any(|x| x == s)
            {
                servers.push(s.to_string());
            }
        }
        servers.sort();
    }
    let sums: Vec<ServerSummary> = servers
        .iter()
        .map(|s| ServerSummary {
            server: s.clone(),
            load: read(&a.dir.join(format!("{s}-load.json"))),
            offline: read(&a.dir.join(format!("{s}-offline.json"))),
        })
        .filter(|s| s.load.is_some() || s.offline.is_some())
        .collect();
    if sums.is_empty() {
        return Err(anyhow!("no results in {}", a.dir.display()));
    }
    let out = a.out.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&out)?;
    let versions = std::fs::read_to_string(a.dir.join("versions.txt")).unwrap_or_default();
    let md = markdown(&sums, &versions);
    std::fs::write(out.join("summary.md"), &md)?;
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&sums)?)?;
    print!("{md}");
    match chart(&sums, &out.join("chart.png")) {
        Ok(()) => eprintln!("wrote {}", out.join("chart.png").display()),
        Err(e) => eprintln!("no chart: {e:#}"),
    }
    eprintln!("wrote {} and {}", out.join("summary.md").display(), out.join("summary.json").display());
    Ok(())
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

fn markdown(sums: &[ServerSummary], versions: &str) -> String {
    let mut s = String::new();
    s.push_str("# XMPP server comparison\n\n");
    if !versions.trim().is_empty() {
        for l in versions.lines() {
            let _ = writeln!(s, "- {l}");
        }
        s.push('\n');
    }
    let _ = write!(s, "| |");
    for x in sums {
        let _ = write!(s, " {} |", x.server);
    }
    s.push_str("\n|---|");
    for _ in sums {
        s.push_str("---:|");
    }
    s.push('\n');
    let load = |x: &ServerSummary| x.load.clone().unwrap_or_default();
    let off = |x: &ServerSummary| x.offline.clone().and_then(|r| r.offline);
    type Row = (&'static str, Box<dyn Fn(&ServerSummary) -> String>);
    let rows: Vec<Row> = vec![
        (
            "sessions logged in",
            Box::new(move |x| load(x).login.map(|l| format!("{}/{}", l.ok, l.attempted)).unwrap_or("–".into())),
        ),
        ("SASL mechanism", Box::new(move |x| load(x).login.map(|l| l.mechanism).unwrap_or("–".into()))),
        ("logins/s", Box::new(move |x| f(load(x).login.map(|l| l.logins_per_s), 0))),
        ("server CPU per login (ms)", Box::new(move |x| f(load(x).login.and_then(|l| l.server_cpu_ms_per_login), 3))),
        ("generator CPU per login (ms)", Box::new(move |x| f(load(x).login.map(|l| l.gen_cpu_ms_per_login), 3))),
        ("server RSS per idle session (KiB)", Box::new(move |x| f(load(x).idle.and_then(|i| i.kib_per_session), 1))),
        (
            "server RSS with all sessions (MiB)",
            Box::new(move |x| f(load(x).idle.and_then(|i| i.rss_after_kib).map(|k| k as f64 / 1024.0), 1)),
        ),
        ("idle server CPU (%)", Box::new(move |x| f(load(x).idle.and_then(|i| i.server_cpu_pct), 1))),
        ("max steady rate within limits (msgs/s)", Box::new(move |x| f(load(x).steady.map(|st| st.max_ok_rate), 0))),
        (
            "p99 at that rate (ms)",
            Box::new(move |x| f(load(x).steady.and_then(|st| st.steps.iter().rfind(|p| p.pass).map(|p| p.p99_ms)), 2)),
        ),
        (
            "server CPU at that rate (%)",
            Box::new(move |x| {
                f(load(x).steady.and_then(|st| st.steps.iter().rfind(|p| p.pass).and_then(|p| p.server_cpu_pct)), 0)
            }),
        ),
        (
            "generator CPU at that rate (%)",
            Box::new(move |x| {
                f(load(x).steady.and_then(|st| st.steps.iter().rfind(|p| p.pass).map(|p| p.gen_cpu_pct)), 0)
            }),
        ),
        (
            "steady load stopped because",
            Box::new(move |x| load(x).steady.map(|st| st.stop_reason).unwrap_or("–".into())),
        ),
        ("offline store (msgs/s)", Box::new(move |x| f(off(x).map(|o| o.store_rate), 0))),
        ("offline drain after login (msgs/s)", Box::new(move |x| f(off(x).map(|o| o.drain_rate), 0))),
        (
            "offline messages received / sent",
            Box::new(move |x| off(x).map(|o| format!("{}/{}", o.received, o.messages)).unwrap_or("–".into())),
        ),
        (
            "other processes' CPU, max over steps (%)",
            Box::new(move |x| {
                f(load(x).steady.and_then(|st| st.steps.iter().filter_map(|p| p.other_cpu_pct).reduce(f64::max)), 0)
            }),
        ),
        (
            "server open-files limit",
            Box::new(move |x| load(x).server_nofile_limit.map(|v| v.to_string()).unwrap_or("–".into())),
        ),
    ];
    for (name, get) in &rows {
        let _ = write!(s, "| {name} |");
        for x in sums {
            let _ = write!(s, " {} |", get(x));
        }
        s.push('\n');
    }
    for x in sums {
        let Some(st) = x.load.as_ref().and_then(|l| l.steady.as_ref()) else {
            continue;
        };
        let _ = writeln!(s, "\n## {}: steady load steps\n", x.server);
        s.push_str("| target/s | sent/s | delivered/s | p50 ms | p90 ms | p99 ms | max ms | lost | late | server CPU % | generator CPU % | other CPU % | server RSS MiB | within limits |\n");
        s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n");
        for p in &st.steps {
            let _ = writeln!(
                s,
                "| {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.0} | {} | {} | {} |",
                p.target_rate,
                p.sent_rate,
                p.delivered_rate,
                p.p50_ms,
                p.p90_ms,
                p.p99_ms,
                p.max_ms,
                p.lost,
                p.late,
                f(p.server_cpu_pct, 0),
                p.gen_cpu_pct,
                f(p.other_cpu_pct, 0),
                f(p.server_rss_kib.map(|k| k as f64 / 1024.0), 1),
                if p.pass { "yes" } else { "no" }
            );
        }
    }
    let errors: Vec<String> = sums
        .iter()
        .flat_map(|x| {
            [&x.load, &x.offline].into_iter().flatten().flat_map(|r| {
                r.errors.iter().map(|e| format!("{} ({}): {e}", r.server, r.scenario)).collect::<Vec<_>>()
            })
        })
        .collect();
    if !errors.is_empty() {
        s.push_str("\n## Errors\n\n");
        for e in errors {
            let _ = writeln!(s, "- {}", e.replace('\n', " "));
        }
    }
    s
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn load_font() -> Result<()> {
    let candidates: Vec<String> =
        std::env::var("BENCH_FONT").into_iter().chain(FONT_PATHS.iter().map(|s| s.to_string())).collect();
    for p in candidates {
        if let Ok(bytes) = std::fs::read(&p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err(anyhow!("no TrueType font found (install fonts-dejavu-core or set BENCH_FONT)"))
}

fn color_of_server(name: &str, i: usize) -> RGBColor {
    match name {
        "chatd" => RGBColor(31, 119, 180),
        "ejabberd" => RGBColor(44, 160, 44),
        "prosody" => RGBColor(255, 127, 14),
        "reference" => RGBColor(127, 127, 127),
        _ => color_of(i + 3),
    }
}

fn color_of(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

fn chart(sums: &[ServerSummary], path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1500, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, rest) = root.split_horizontally(700);
    let (mid, right) = rest.split_horizontally(400);
    latency_panel(sums, &left)?;
    let mem: Vec<(String, f64)> = sums
        .iter()
        .map(|x| {
            (
                x.server.clone(),
                x.load.as_ref().and_then(|l| l.idle.as_ref()).and_then(|i| i.kib_per_session).unwrap_or(0.0),
            )
        })
        .collect();
    bar_panel(&mid, "Server memory per idle session", "KiB per session", &mem)?;
    let logins: Vec<(String, f64)> = sums
        .iter()
        .map(|x| {
            (x.server.clone(), x.load.as_ref().and_then(|l| l.login.as_ref()).map(|l| l.logins_per_s).unwrap_or(0.0))
        })
        .collect();
    bar_panel(&right, "Login rate", "logins/s", &logins)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn latency_panel(sums: &[ServerSummary], area: &DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = sums
        .iter()
        .map(|x| {
            let pts = x
                .load
                .as_ref()
                .and_then(|l| l.steady.as_ref())
                .map(|st| {
                    st.steps
                        .iter()
                        .filter(|p| p.delivered_rate > 0.0)
                        .map(|p| (p.delivered_rate, p.p99_ms.max(0.01)))
                        .collect()
                })
                .unwrap_or_default();
            (x.server.clone(), pts)
        })
        .collect();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let limit = sums.iter().filter_map(|x| x.load.as_ref()?.steady.as_ref().map(|s| s.max_p99_ms)).fold(10.0, f64::max);
    let xmin = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).min(100.0);
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max).max(1000.0) * 1.5;
    let ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min).min(0.1) * 0.8;
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max).max(limit * 2.0) * 1.5;
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let mut ch = ChartBuilder::on(area)
        .caption("Delivered messages/s vs p99 latency", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
        .map_err(|x| e(&x))?;
    ch.configure_mesh()
        .x_desc("delivered messages/s")
        .y_desc("p99 latency (ms)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if *v >= 1.0 { format!("{v:.0}") } else { format!("{v:.2}") }
        })
        .draw()
        .map_err(|x| e(&x))?;
    ch.draw_series(DashedLineSeries::new(vec![(xmin, limit), (xmax, limit)], 8, 6, RED.mix(0.6).stroke_width(1)))
        .map_err(|x| e(&x))?
        .label(format!("p99 limit {limit} ms"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.6).stroke_width(1)));
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color_of_server(name, i);
        ch.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        ch.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled()))).map_err(|x| e(&x))?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}

fn bar_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    ydesc: &str,
    vals: &[(String, f64)],
) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let n = vals.len().max(1) as u32;
    let ymax = vals.iter().map(|v| v.1).fold(0.0, f64::max).max(1.0) * 1.2;
    let names: Vec<String> = vals.iter().map(|v| v.0.clone()).collect();
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n - 1).into_segmented(), 0f64..ymax)
        .map_err(|x| e(&x))?;
    ch.configure_mesh()
        .disable_x_mesh()
        .y_desc(ydesc)
        .y_label_formatter(&|v| {
            if ymax >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") }
        })
        .x_labels(vals.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, v)) in vals.iter().enumerate() {
        let c = color_of_server(name, i);
        let i = i as u32;
        let mut bar = Rectangle::new([(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)], c.filled());
        bar.set_margin(0, 0, 12, 12);
        ch.draw_series(std::iter::once(bar)).map_err(|x| e(&x))?;
        ch.draw_series(std::iter::once(Text::new(
            if *v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") },
            (SegmentValue::CenterOf(i), *v + ymax * 0.02),
            ("sans-serif", 15).into_font().color(&BLACK),
        )))
        .map_err(|x| e(&x))?;
    }
    Ok(())
}
