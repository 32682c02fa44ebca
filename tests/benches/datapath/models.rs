//! The driver-model tables: every model of `vu_tests::driver_models` against `vu_null` and
//! both rust-vmm idioms (one interrupt decision per pass, and one per chain), on one CPU and
//! across two, at depths 1, 32 and 128 with chains of 1 and 3 descriptors, EVENT_IDX on.

use super::*;

/// The backends every driver model is run against.
const BACKENDS: [Impl; 3] = [Impl::Vu, Impl::Ref, Impl::RefChain];

/// One cell of a driver model's table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelCell {
    pub(crate) model: Model,
    pub(crate) cell: Cell,
}

/// The medians of one cell: for each backend of [`BACKENDS`], requests per second,
/// interrupts per request and the driver's blocking waits per request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelRow {
    pub(crate) at: ModelCell,
    pub(crate) rate: [f64; 3],
    pub(crate) irqs: [f64; 3],
    pub(crate) sleeps: [f64; 3],
}

impl ModelRow {
    /// vu's rate over the best reference idiom's.
    pub(crate) fn ratio(&self) -> f64 {
        self.rate[0] / self.rate[1].max(self.rate[2])
    }
}

/// Which cells to run (`--model`, `--cpus`, `--depth`, `--descs` narrow the matrix).
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelFilter {
    pub(crate) models: Vec<Model>,
    pub(crate) placement: Option<Placement>,
    pub(crate) descs: Option<usize>,
}

fn model_cells(opts: &Options) -> Vec<ModelCell> {
    let f = &opts.model_filter;
    let models: Vec<Model> = if f.models.is_empty() {
        Model::ALL.to_vec()
    } else {
        f.models.clone()
    };
    let depths: &[usize] = if opts.smoke { &[1, 32] } else { &[1, 32, 128] };
    let mut cells = Vec::new();
    for &model in &models {
        for placement in [Placement::OneCpu, Placement::TwoCpus] {
            if f.placement.is_some_and(|p| p != placement) {
                continue;
            }
            for &depth in depths
                .iter()
                .filter(|&&d| opts.depth.is_none_or(|o| o == d))
            {
                for descs in [1, 3] {
                    if f.descs.is_some_and(|d| d != descs) {
                        continue;
                    }
                    let cell = Cell {
                        placement,
                        depth,
                        descs,
                        event_idx: true,
                    };
                    cells.push(ModelCell { model, cell });
                }
            }
        }
    }
    cells
}

/// One run of `which` under the driver model of `at`, after a warm-up of 1000 requests.
fn measure_model(opts: &Options, which: Impl, at: ModelCell, t: Duration) -> Outcome {
    let cell = at.cell;
    let backend = Backend::spawn(opts, which, cell.placement.backend_cpu(), &[], None);
    let (mut device, _) = handshake(&backend.path, true, &cell.chain());
    let q = &mut device.queue;
    driver_models::drive(q, at.model, cell.depth, Until::Requests(1000), TIMEOUT);
    let out = driver_models::drive(q, at.model, cell.depth, Until::Time(t), TIMEOUT);
    drop(device);
    backend.finish();
    out
}

/// Runs the matrix `opts.runs` times, the backends of each cell in a rotating order, and
/// prints one table per model; returns the rows.
pub(crate) fn models(opts: &Options) -> Vec<ModelRow> {
    pin_self(0);
    let cells = model_cells(opts);
    let mut samples: Vec<[Vec<Outcome>; 3]> = cells.iter().map(|_| Default::default()).collect();
    for run in 0..opts.runs {
        eprintln!("driver models: run {} of {}", run + 1, opts.runs);
        for (i, &at) in cells.iter().enumerate() {
            for k in 0..BACKENDS.len() {
                let b = (run + i + k) % BACKENDS.len();
                let out = measure_model(opts, BACKENDS[b], at, opts.run_time);
                samples[i][b].push(out);
            }
        }
    }
    let rows: Vec<ModelRow> = cells
        .iter()
        .zip(&samples)
        .map(|(&at, s)| ModelRow {
            at,
            rate: [0, 1, 2].map(|b| median(s[b].iter().map(Outcome::rate).collect())),
            irqs: [0, 1, 2]
                .map(|b| median(s[b].iter().map(Outcome::interrupts_per_request).collect())),
            sleeps: [0, 1, 2]
                .map(|b| median(s[b].iter().map(Outcome::sleeps_per_request).collect())),
        })
        .collect();
    print_model_tables(opts, &rows);
    if let Some(dir) = &opts.svg_dir {
        match write_charts(dir, &rows) {
            Ok(()) => println!("\ncharts: {}/model-*.svg", dir.display()),
            Err(e) => eprintln!(
                "datapath: cannot write the charts into {}: {e}",
                dir.display()
            ),
        }
    }
    rows
}

fn print_model_tables(opts: &Options, rows: &[ModelRow]) {
    let mut seen: Vec<Model> = Vec::new();
    for row in rows {
        if seen.contains(&row.at.model) {
            continue;
        }
        let model = row.at.model;
        seen.push(model);
        println!(
            "\n### Driver model `{}` (requests/s, interrupts and the driver's blocking waits per request, EVENT_IDX; medians of {} interleaved runs of {} ms)\n",
            model.name(),
            opts.runs,
            opts.run_time.as_millis()
        );
        println!("| placement | depth | descs | vu | irq/req | sleeps/req | ref batch | irq/req | sleeps/req | ref per chain | irq/req | sleeps/req | vu/best ref |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.at.model == model) {
            let c = r.at.cell;
            println!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {} | {:.3} | {:.3} | {:.2} |",
                c.placement.name(),
                c.depth,
                c.descs,
                fmt_rate(r.rate[0]),
                r.irqs[0],
                r.sleeps[0],
                fmt_rate(r.rate[1]),
                r.irqs[1],
                r.sleeps[1],
                fmt_rate(r.rate[2]),
                r.irqs[2],
                r.sleeps[2],
                r.ratio(),
            );
        }
    }
    if let Some(worst) = rows.iter().min_by(|a, b| a.ratio().total_cmp(&b.ratio())) {
        println!(
            "\nlowest vu/best ref: {:.2} (`{}`, {}, depth {}, {} desc)",
            worst.ratio(),
            worst.at.model.name(),
            worst.at.cell.placement.name(),
            worst.at.cell.depth,
            worst.at.cell.descs
        );
    }
}

/// Colours of the backends of [`BACKENDS`] in the charts.
const COLOURS: [&str; 3] = ["#1b7837", "#2166ac", "#b2182b"];

/// Writes one SVG chart per model into `dir`: requests per second (log scale) and interrupts
/// per request against depth, one line per backend and placement (1 CPU solid, 2 CPUs
/// dashed), chains of one descriptor.
pub(crate) fn write_charts(dir: &Path, rows: &[ModelRow]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    for model in Model::ALL {
        let mine: Vec<&ModelRow> = rows
            .iter()
            .filter(|r| r.at.model == model && r.at.cell.descs == 1)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let svg = chart(model, &mine);
        fs::write(dir.join(format!("model-{}.svg", model.name())), svg)?;
    }
    Ok(())
}

/// The SVG text of one model's chart.
fn chart(model: Model, rows: &[&ModelRow]) -> String {
    const W: f64 = 300.0;
    const H: f64 = 200.0;
    const LEFT: f64 = 60.0;
    const TOP: f64 = 40.0;
    let depths = [1.0f64, 32.0, 128.0];
    let x = |panel: f64, depth: f64| {
        let at = depths.iter().position(|&d| d == depth).unwrap_or(0) as f64;
        LEFT + panel * (W + LEFT) + at * W / 2.0
    };
    let max_rate = rows
        .iter()
        .flat_map(|r| r.rate)
        .fold(1.0f64, f64::max)
        .log10()
        .ceil();
    let min_rate = rows
        .iter()
        .flat_map(|r| r.rate)
        .filter(|r| *r > 0.0)
        .fold(f64::MAX, f64::min)
        .log10()
        .floor()
        .min(max_rate - 1.0);
    let y_rate = |r: f64| TOP + H - (r.max(1.0).log10() - min_rate) / (max_rate - min_rate) * H;
    let y_irq = |i: f64| TOP + H - i.clamp(0.0, 1.0) * H;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * (W + LEFT) + 20.0,
        TOP + H + 125.0
    );
    s += &format!(
        "<text x=\"{LEFT}\" y=\"18\" font-size=\"13\">driver model {}: requests/s (log) and interrupts per request against depth, 1 descriptor</text>\n",
        model.name()
    );
    for (panel, label) in [(0.0, "requests/s"), (1.0, "interrupts/request")] {
        let x0 = LEFT + panel * (W + LEFT);
        s += &format!(
            "<rect x=\"{x0}\" y=\"{TOP}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>\n<text x=\"{x0}\" y=\"{}\">{label}</text>\n",
            TOP - 5.0
        );
        for &d in &depths {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{d}</text>\n",
                x(panel, d),
                TOP + H + 14.0
            );
        }
    }
    let mut decade = min_rate;
    while decade <= max_rate {
        let y = y_rate(10f64.powf(decade));
        s += &format!(
            "<text x=\"{}\" y=\"{y}\" text-anchor=\"end\">1e{decade}</text>\n",
            LEFT - 4.0
        );
        decade += 1.0;
    }
    for v in [0.0, 0.5, 1.0] {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v}</text>\n",
            2.0 * LEFT + W - 4.0,
            y_irq(v)
        );
    }
    let mut legend_y = TOP + H + 34.0;
    for placement in [Placement::OneCpu, Placement::TwoCpus] {
        let dash = if placement == Placement::OneCpu {
            ""
        } else {
            " stroke-dasharray=\"5,3\""
        };
        for (b, which) in BACKENDS.iter().enumerate() {
            let mut pts: Vec<&&ModelRow> = rows
                .iter()
                .filter(|r| r.at.cell.placement == placement)
                .collect();
            pts.sort_by_key(|r| r.at.cell.depth);
            if pts.is_empty() {
                continue;
            }
            let line = |panel: f64, y: &dyn Fn(&ModelRow) -> f64| {
                let p: Vec<String> = pts
                    .iter()
                    .map(|r| format!("{:.1},{:.1}", x(panel, r.at.cell.depth as f64), y(r)))
                    .collect();
                format!(
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
                    COLOURS[b],
                    p.join(" ")
                )
            };
            s += &line(0.0, &|r| y_rate(r.rate[b]));
            s += &line(1.0, &|r| y_irq(r.irqs[b]));
            {
                s += &format!(
                    "<line x1=\"{LEFT}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{}, {}</text>\n",
                    LEFT + 24.0,
                    COLOURS[b],
                    LEFT + 30.0,
                    legend_y + 4.0,
                    which.name(),
                    placement.name()
                );
                legend_y += 14.0;
            }
        }
    }
    s += "</svg>\n";
    s
}
