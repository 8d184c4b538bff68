//! SVG line plots of curves such as the loss along a path, and filled contour plots of
//! loss planes (feature `plot`).
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
use crate::path::LossSurface;

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
        check_size(self.size)?;
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
        write_file(path.as_ref(), &self.to_svg_string()?)
    }
}

fn write_file(path: &Path, svg: &str) -> Result<()> {
    std::fs::write(path, svg).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn check_size((w, h): (u32, u32)) -> Result<()> {
    if w < 100 || h < 100 {
        return Err(Error::invalid(
            "size",
            format!("each side must be at least 100 pixels, got {w} x {h}"),
        ));
    }
    Ok(())
}

/// A filled contour plot of a [`LossSurface`] (a loss plane, [`Plane`](crate::path::Plane)):
/// each grid cell coloured by its level (`levels` levels, dark for low values, light
/// for high; log-spaced when every value is positive, linear otherwise), the three
/// models marked and named.
///
/// ```
/// use modelfusion::path::{loss_surface, Plane};
/// use modelfusion::plot::SurfacePlot;
/// use modelfusion::{Model, StateDict};
/// use ndarray::arr1;
/// let m = |w: [f64; 2]| StateDict::from_pairs([("w", arr1(&w).into_dyn())]).unwrap();
/// let plane = Plane::through(&m([0.0, 0.0]), &m([1.0, 0.0]), &m([0.0, 1.0]))?;
/// let (xs, ys) = plane.grid(9, 0.2)?;
/// let f = |x: &StateDict<ndarray::ArrayD<f64>>| -> modelfusion::Result<f64> { Ok(1.0 + x.norm()) };
/// let svg = SurfacePlot::new("loss plane", loss_surface(&plane, &f, &xs, &ys)?)
///     .with_names(["start", "end", "bend"])
///     .to_svg_string()?;
/// assert!(svg.starts_with("<svg") && svg.contains("bend") && svg.contains("log-spaced"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SurfacePlot {
    title: String,
    surface: LossSurface,
    names: [String; 3],
    levels: usize,
    size: (u32, u32),
}

impl SurfacePlot {
    /// A plot of `surface` called `title`, 700 x 600 pixels, 12 levels, the models
    /// named "a", "b", "c".
    pub fn new(title: impl Into<String>, surface: LossSurface) -> Self {
        SurfacePlot {
            title: title.into(),
            surface,
            names: ["a".into(), "b".into(), "c".into()],
            levels: 12,
            size: (700, 600),
        }
    }

    /// The names shown next to the three models.
    pub fn with_names(mut self, names: [&str; 3]) -> Self {
        self.names = names.map(String::from);
        self
    }

    /// The number of colour levels (at least 2).
    pub fn with_levels(mut self, levels: usize) -> Self {
        self.levels = levels;
        self
    }

    /// The image size in pixels (each side at least 100).
    pub fn with_size(mut self, width: u32, height: u32) -> Self {
        self.size = (width, height);
        self
    }

    /// The level (0 = lowest) of every value, and the scale's description.
    fn level_map(&self) -> Result<(Vec<usize>, String)> {
        let v = &self.surface.values;
        if let Some(((j, i), x)) = v.indexed_iter().find(|(_, x)| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: format!(
                    "surface value {x} at grid point ({}, {})",
                    self.surface.xs[i], self.surface.ys[j]
                ),
            });
        }
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let log = lo > 0.0;
        let f = |x: f64| if log { x.ln() } else { x };
        let (flo, fhi) = (f(lo), f(hi));
        let top = self.levels - 1;
        let levels = v
            .iter()
            .map(|&x| {
                if fhi > flo {
                    (((f(x) - flo) / (fhi - flo) * self.levels as f64) as usize).min(top)
                } else {
                    0
                }
            })
            .collect();
        let scale = if log { "log-spaced" } else { "linear" };
        Ok((
            levels,
            format!("{} {scale} levels, {lo:.3} to {hi:.3}", self.levels),
        ))
    }

    /// The plot as an SVG document.
    ///
    /// Errors when the size or the level count is out of range, the grid has fewer than
    /// two points on an axis, or a value is not finite.
    pub fn to_svg_string(&self) -> Result<String> {
        check_size(self.size)?;
        if self.levels < 2 {
            return Err(Error::invalid(
                "levels",
                format!("{}; expected at least 2", self.levels),
            ));
        }
        let (xs, ys) = (&self.surface.xs, &self.surface.ys);
        if xs.len() < 2 || ys.len() < 2 || self.surface.values.dim() != (ys.len(), xs.len()) {
            return Err(Error::shape(
                "surface values (y points, x points), at least 2 x 2",
                &[ys.len().max(2), xs.len().max(2)],
                &[self.surface.values.nrows(), self.surface.values.ncols()],
            ));
        }
        let (levels, scale) = self.level_map()?;
        // Cell edges halfway between grid coordinates.
        let edges = |c: &[f64]| -> Vec<f64> {
            let mut e = vec![c[0] - (c[1] - c[0]) / 2.0];
            e.extend(c.windows(2).map(|w| (w[0] + w[1]) / 2.0));
            e.push(c[c.len() - 1] + (c[c.len() - 1] - c[c.len() - 2]) / 2.0);
            e
        };
        let (ex, ey) = (edges(xs), edges(ys));
        let (low, high) = (RGBColor(40, 30, 110), RGBColor(250, 230, 120));
        let colour = |k: usize| {
            let t = k as f64 / (self.levels - 1) as f64;
            let mix =
                |a: u8, b: u8| (f64::from(a) + t * (f64::from(b) - f64::from(a))).round() as u8;
            RGBColor(mix(low.0, high.0), mix(low.1, high.1), mix(low.2, high.2))
        };
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size).into_drawing_area();
            root.fill(&WHITE).map_err(draw_error)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("{} ({scale})", self.title), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(ex[0]..ex[ex.len() - 1], ey[0]..ey[ey.len() - 1])
                .map_err(draw_error)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc("distance along a -> b")
                .y_desc("distance towards c")
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(draw_error)?;
            let nx = xs.len();
            chart
                .draw_series(levels.iter().enumerate().map(|(k, &l)| {
                    let (j, i) = (k / nx, k % nx);
                    Rectangle::new(
                        [(ex[i], ey[j]), (ex[i + 1], ey[j + 1])],
                        ShapeStyle::from(colour(l)).filled(),
                    )
                }))
                .map_err(draw_error)?;
            for (p, name) in self.surface.points.iter().zip(&self.names) {
                chart
                    .draw_series([EmptyElement::at(*p)
                        + Circle::new((0, 0), 5, ShapeStyle::from(WHITE).filled())
                        + Circle::new((0, 0), 5, ShapeStyle::from(BLACK).stroke_width(2))
                        + Text::new(
                            name.clone(),
                            (8, -8),
                            ("sans-serif", 16).into_font().color(&WHITE),
                        )])
                    .map_err(draw_error)?;
            }
            root.present().map_err(draw_error)?;
        }
        Ok(svg)
    }

    /// Writes the plot as SVG to `path`.
    pub fn write_svg(&self, path: impl AsRef<Path>) -> Result<()> {
        write_file(path.as_ref(), &self.to_svg_string()?)
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
