//! The sweep's charts, drawn with `plotters` into PNG and SVG: lines of medians with error bars
//! from the smallest to the largest repetition.

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One point of a line: x, and the median, smallest and largest of its repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pt {
    pub x: f64,
    pub med: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Pt {
    /// The point of `ys` (one per repetition) at `x`; `None` without repetitions.
    pub fn of(x: f64, ys: &[f64]) -> Option<Pt> {
        let mut v: Vec<f64> = ys.iter().copied().filter(|y| y.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let med = match n {
            0 => return None,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Some(Pt {
            x,
            med,
            lo: v[0],
            hi: v[n - 1],
        })
    }
}

/// A chart: its title, axis labels, whether y is logarithmic, and its named lines.
pub struct Chart<'a> {
    pub file: &'a str,
    pub title: String,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_y: bool,
    pub lines: Vec<(String, Vec<Pt>)>,
}

/// Fonts looked for, in order, for the charts' text (Debian's fonts-dejavu-core first, which
/// `ci.sh` installs).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a TrueType font as `sans-serif`, once per process.
pub fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS.iter().find(|p| Path::new(p).exists()).ok_or_else(|| {
            format!(
                "no TrueType font for the charts' text (looked for {}); install fonts-dejavu-core",
                FONTS.join(", ")
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path}: not a font plotters can read"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `c` as `DIR/<file>.png` and `DIR/<file>.svg`.
pub fn draw(c: &Chart<'_>, dir: &Path) -> Result<()> {
    font()?;
    if c.lines.iter().all(|(_, pts)| pts.is_empty()) {
        bail!("{}: nothing to draw", c.file);
    }
    let png = dir.join(format!("{}.png", c.file));
    let svg = dir.join(format!("{}.svg", c.file));
    plot(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), c).map_err(|e| anyhow!("{}: {e}", png.display()))?;
    plot(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), c).map_err(|e| anyhow!("{}: {e}", svg.display()))?;
    Ok(())
}

const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
];

fn plot<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Chart<'_>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let pts = c.lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in pts {
        x0 = x0.min(p.x);
        x1 = x1.max(p.x);
        y0 = y0.min(p.lo);
        y1 = y1.max(p.hi);
    }
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let (x0, x1) = (x0 - pad, x1 + pad);
    let mut chart = ChartBuilder::on(&root);
    chart
        .caption(&c.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    // Each y scale draws the same way: the mesh, the lines with their error bars, the legend.
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(c.x_label)
                .y_desc(c.y_label)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(e)?;
            for (i, (name, line)) in c.lines.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                ctx.draw_series(LineSeries::new(
                    line.iter().map(|p| (p.x, p.med)),
                    color.stroke_width(2),
                ))
                .map_err(e)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                ctx.draw_series(line.iter().map(|p| Circle::new((p.x, p.med), 4, color.filled())))
                    .map_err(e)?;
                ctx.draw_series(
                    line.iter()
                        .map(|p| ErrorBar::new_vertical(p.x, p.lo, p.med, p.hi, color.stroke_width(1), 8)),
                )
                .map_err(e)?;
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(e)?;
        }};
    }
    if c.log_y {
        // Headroom above the highest line for the legend.
        let (y0, y1) = ((y0 * 0.7).max(1e-3), (y1 * 4.0).max(1e-2));
        body!(chart.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(e)?);
    } else {
        let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
        body!(chart.build_cartesian_2d(x0..x1, 0.0..y1).map_err(e)?);
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_the_median_and_the_spread_of_its_repetitions() {
        assert_eq!(
            Pt::of(1.0, &[3.0, 1.0, 2.0]),
            Some(Pt {
                x: 1.0,
                med: 2.0,
                lo: 1.0,
                hi: 3.0
            })
        );
        assert_eq!(Pt::of(0.0, &[4.0, 2.0]).map(|p| p.med), Some(3.0));
        assert_eq!(Pt::of(0.0, &[f64::NAN]), None);
        assert_eq!(Pt::of(0.0, &[]), None);
    }

    #[test]
    fn charts_are_written_as_png_and_svg() {
        let dir = std::env::temp_dir().join(format!("livemig-chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pts = |k: f64| {
            (0..4)
                .filter_map(|i| Pt::of(i as f64 * 32.0, &[k * (i + 1) as f64, k * (i + 2) as f64]))
                .collect()
        };
        for log_y in [false, true] {
            let c = Chart {
                file: if log_y { "log" } else { "linear" },
                title: "test".into(),
                x_label: "x",
                y_label: "y",
                log_y,
                lines: vec![("alpha-line".into(), pts(1.0)), ("beta-line".into(), pts(10.0))],
            };
            draw(&c, &dir).unwrap();
            let png = std::fs::read(dir.join(format!("{}.png", c.file))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            let svg = std::fs::read_to_string(dir.join(format!("{}.svg", c.file))).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("alpha-line") && svg.contains("beta-line"),
                "legend in the SVG"
            );
        }
        let empty = Chart {
            file: "empty",
            title: "t".into(),
            x_label: "x",
            y_label: "y",
            log_y: false,
            lines: vec![("a".into(), vec![])],
        };
        assert!(draw(&empty, &dir).unwrap_err().to_string().contains("nothing to draw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
