//! SVG line plots of curves such as the loss along a path (feature `plot`).
//!
//! Built on plotters' SVG backend, which writes text as `<text>` elements: no system
//! fonts are needed to produce the file (the viewer renders the text).
//!
//! ```
//! use modelfusion::plot::{LinePlot, Series};
//!
//! let naive = Series::new("naive", vec![(0.0, 0.1), (0.5, 2.3), (1.0, 0.1)]);
//! let aligned = Series::new("aligned", vec![(0.0, 0.1), (0.5, 0.2), (1.0, 0.1)]);
//! let svg = LinePlot::new("Loss along the path")
//!     .with_labels("t", "loss")
//!     .with_series(naive)
//!     .with_series(aligned)
//!     .to_svg_string()?;
//! assert!(svg.starts_with("<svg") && svg.contains("naive") && svg.contains("aligned"));
//! # Ok::<(), modelfusion::Error>(())
//! ```

use std::path::Path;

use plotters::prelude::*;

use crate::barrier::BarrierReport;
use crate::error::{Error, Result};

/// One named curve: `(x, y)` points drawn in order.
///
/// ```
/// use modelfusion::plot::Series;
/// let s = Series::new("loss", vec![(0.0, 1.0), (1.0, 2.0)]);
/// assert_eq!(s.name(), "loss");
/// assert_eq!(s.points().len(), 2);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

impl Series {
    /// A curve called `name` through `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }

    /// The curve `(t, L(phi(t)))` of a barrier report.
    ///
    /// ```
    /// use modelfusion::barrier::BarrierReport;
    /// use modelfusion::plot::Series;
    /// let r = BarrierReport { curve: vec![(0.0, 1.0), (1.0, 1.0)], start: 1.0, end: 1.0,
    ///     frankle: 0.0, frankle_t: 0.0, interpolated: 0.0, interpolated_t: 0.0 };
    /// assert_eq!(Series::from_report("line", &r).points(), &[(0.0, 1.0), (1.0, 1.0)]);
    /// ```
    pub fn from_report(name: impl Into<String>, report: &BarrierReport) -> Self {
        Series::new(name, report.curve.clone())
    }

    /// The name shown in the legend.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The points.
    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }
}

/// A line plot: one or more named [`Series`], axis labels and a title.
///
/// ```no_run
/// use modelfusion::plot::{LinePlot, Series};
/// LinePlot::new("Barrier")
///     .with_labels("t", "test error")
///     .with_series(Series::new("linear", vec![(0.0, 0.02), (0.5, 0.4), (1.0, 0.02)]))
///     .write_svg("barrier.svg")?;
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LinePlot {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    size: (u32, u32),
}

/// Colours of successive series (colour-blind friendly, Okabe-Ito).
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

impl LinePlot {
    /// An empty plot called `title`, 800 x 500 pixels, axes labelled "t" and "value".
    pub fn new(title: impl Into<String>) -> Self {
        LinePlot {
            title: title.into(),
            x_label: "t".into(),
            y_label: "value".into(),
            series: Vec::new(),
            size: (800, 500),
        }
    }

    /// The axis labels.
    pub fn with_labels(mut self, x_label: impl Into<String>, y_label: impl Into<String>) -> Self {
        self.x_label = x_label.into();
        self.y_label = y_label.into();
        self
    }

    /// Adds a curve.
    pub fn with_series(mut self, series: Series) -> Self {
        self.series.push(series);
        self
    }

    /// The image size in pixels (each side at least 100).
    pub fn with_size(mut self, width: u32, height: u32) -> Self {
        self.size = (width, height);
        self
    }

    /// The series added so far.
    ///
    /// ```
    /// use modelfusion::plot::{LinePlot, Series};
    /// let p = LinePlot::new("x").with_series(Series::new("a", vec![(0.0, 0.0)]));
    /// assert_eq!(p.series().len(), 1);
    /// ```
    pub fn series(&self) -> &[Series] {
        &self.series
    }

    fn validate(&self) -> Result<((f64, f64), (f64, f64))> {
        if self.series.is_empty() {
            return Err(Error::empty("the plot has no series"));
        }
        let (w, h) = self.size;
        if w < 100 || h < 100 {
            return Err(Error::invalid(
                "size",
                format!("each side must be at least 100 pixels, got {w} x {h}"),
            ));
        }
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for s in &self.series {
            if s.points.is_empty() {
                return Err(Error::empty(format!("series `{}` has no points", s.name)));
            }
            for (i, &(x, y)) in s.points.iter().enumerate() {
                if !(x.is_finite() && y.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!("point {i} ({x}, {y}) of series `{}`", s.name),
                    });
                }
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
        }
        Ok((pad(x0, x1, 0.0), pad(y0, y1, 0.05)))
    }

    /// The plot as an SVG document.
    pub fn to_svg_string(&self) -> Result<String> {
        let ((x0, x1), (y0, y1)) = self.validate()?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size).into_drawing_area();
            root.fill(&WHITE).map_err(draw_error)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(&self.title, ("sans-serif", 26))
                .margin(12)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(draw_error)?;
            chart
                .configure_mesh()
                .x_desc(&self.x_label)
                .y_desc(&self.y_label)
                .axis_desc_style(("sans-serif", 18))
                .label_style(("sans-serif", 14))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(draw_error)?;
            for (i, s) in self.series.iter().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                let style = ShapeStyle::from(colour).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), style))
                    .map_err(draw_error)?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                chart
                    .draw_series(
                        s.points
                            .iter()
                            .map(|&p| Circle::new(p, 2, ShapeStyle::from(colour).filled())),
                    )
                    .map_err(draw_error)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(draw_error)?;
            root.present().map_err(draw_error)?;
        }
        Ok(svg)
    }

    /// Writes the plot as SVG to `path`.
    pub fn write_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        let svg = self.to_svg_string()?;
        let path = path.as_ref();
        std::fs::write(path, svg).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Writes an SVG plot of `series` (value against `t`) to `path`: the one-call form of
/// [`LinePlot`].
///
/// ```
/// use modelfusion::plot::{plot_curves, Series};
/// let dir = std::env::temp_dir().join("modelfusion-plot-doc");
/// std::fs::create_dir_all(&dir).unwrap();
/// let file = dir.join("curves.svg");
/// plot_curves(&file, "Loss along t", "t", "loss", &[Series::new("a", vec![(0.0, 1.0), (1.0, 0.5)])])?;
/// assert!(std::fs::read_to_string(&file).unwrap().contains("Loss along t"));
/// assert!(plot_curves(&file, "empty", "t", "loss", &[]).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn plot_curves(
    path: impl AsRef<Path>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let plot = series.iter().cloned().fold(
        LinePlot::new(title).with_labels(x_label, y_label),
        LinePlot::with_series,
    );
    plot.write_svg(path)
}

/// A non-empty range around `[lo, hi]`, widened by `frac` of its span on each side.
fn pad(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - frac * span, hi + frac * span)
    } else {
        let d = 0.05 * lo.abs().max(1.0);
        (lo - d, hi + d)
    }
}

fn draw_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::invalid("plot", format!("drawing failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_curves() -> LinePlot {
        let ts: Vec<f64> = (0..=24).map(|i| i as f64 / 24.0).collect();
        let naive = ts
            .iter()
            .map(|&t| (t, 0.1 + 2.0 * (std::f64::consts::PI * t).sin()))
            .collect();
        let aligned = ts
            .iter()
            .map(|&t| (t, 0.1 + 0.2 * (std::f64::consts::PI * t).sin()))
            .collect();
        LinePlot::new("Loss along the linear path")
            .with_labels("t", "test loss")
            .with_series(Series::new("naive", naive))
            .with_series(Series::new("weight matching", aligned))
    }

    #[test]
    fn svg_has_title_labels_legend_and_lines() {
        let svg = two_curves().to_svg_string().unwrap();
        for needle in [
            "<svg",
            "Loss along the linear path",
            "\nt\n",
            "test loss",
            "naive",
            "weight matching",
            "<polyline",
            "<text",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // One polyline per series (plus the legend's sample lines).
        assert!(svg.matches("<polyline").count() >= 2);
        // Both colours are used.
        assert!(svg.contains("#0072B2") && svg.contains("#D55E00"));
    }

    #[test]
    fn writes_a_file() {
        let dir = std::env::temp_dir().join(format!("modelfusion-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("two.svg");
        two_curves().write_svg(&file).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text, two_curves().to_svg_string().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn constant_and_single_point_series_plot() {
        let p = LinePlot::new("flat").with_series(Series::new("c", vec![(0.5, 2.0)]));
        assert!(p.to_svg_string().unwrap().contains("flat"));
        assert_eq!(pad(2.0, 2.0, 0.05), (1.9, 2.1));
        assert_eq!(pad(0.0, 0.0, 0.05), (-0.05, 0.05));
        assert_eq!(pad(0.0, 1.0, 0.0), (0.0, 1.0));
    }

    #[test]
    fn bad_input() {
        let e = LinePlot::new("x").to_svg_string().unwrap_err();
        assert!(matches!(e, Error::Empty { .. }), "{e}");
        let e = LinePlot::new("x")
            .with_series(Series::new("empty one", vec![]))
            .to_svg_string()
            .unwrap_err();
        assert!(e.to_string().contains("empty one"), "{e}");
        let e = LinePlot::new("x")
            .with_series(Series::new("bad", vec![(0.0, 1.0), (0.5, f64::NAN)]))
            .to_svg_string()
            .unwrap_err();
        assert!(
            matches!(e, Error::NonFinite { .. }) && e.to_string().contains("point 1"),
            "{e}"
        );
        let e = two_curves().with_size(50, 400).to_svg_string().unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        // An unwritable path is an I/O error naming it.
        let e = two_curves()
            .write_svg("/nonexistent-dir/sub/plot.svg")
            .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(
            e.to_string().contains("/nonexistent-dir/sub/plot.svg"),
            "{e}"
        );
        let never = std::env::temp_dir().join("modelfusion-never.svg");
        assert!(plot_curves(&never, "t", "x", "y", &[]).is_err());
    }
}
