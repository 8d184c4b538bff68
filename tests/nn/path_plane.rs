//! Loss planes: the plane through three models reproduces them, is isometric, and a
//! squared distance evaluated on it is the closed-form paraboloid; bad input is named.

use modelfusion::path::{Plane, loss_surface};
use modelfusion::{Model, Result, StateDict};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

type Sd = StateDict<ArrayD<f64>>;

fn model(values: &[f64]) -> Sd {
    let (w, b) = values.split_at(6);
    StateDict::from_pairs([
        (
            "w",
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), w.to_vec()).unwrap(),
        ),
        (
            "b",
            ArrayD::from_shape_vec(IxDyn(&[b.len()]), b.to_vec()).unwrap(),
        ),
    ])
    .unwrap()
}

fn three() -> impl Strategy<Value = [Vec<f64>; 3]> {
    let v = || prop::collection::vec(-3.0f64..3.0, 8);
    (v(), v(), v()).prop_map(|(a, b, c)| [a, b, c])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_plane_reproduces_its_models_and_keeps_distances([a, b, c] in three(), x in -2.0f64..2.0, y in -2.0f64..2.0) {
        let (a, b, c) = (model(&a), model(&b), model(&c));
        let plane = match Plane::through(&a, &b, &c) {
            Ok(p) => p,
            Err(_) => return Ok(()), // (nearly) collinear draws
        };
        let scale = 1.0 + a.norm() + b.norm() + c.norm();
        for (p, m) in plane.points().iter().zip([&a, &b, &c]) {
            let d = plane.point(p.0, p.1).unwrap().max_abs_diff(m).unwrap();
            prop_assert!(d < 1e-12 * scale, "model at {p:?} off by {d}");
        }
        // The map (x, y) -> model is an isometry.
        let (p, q) = (plane.point(x, y).unwrap(), plane.point(0.3, -0.7).unwrap());
        let d = p.sub(&q).unwrap().norm();
        let want = ((x - 0.3).powi(2) + (y + 0.7).powi(2)).sqrt();
        prop_assert!((d - want).abs() < 1e-9 * scale, "{d} vs {want}");
        // The squared distance to c on the plane is the paraboloid around c's coordinates.
        let (cx, cy) = plane.points()[2];
        let f = |m: &Sd| -> Result<f64> { Ok(m.sub(&c)?.norm().powi(2)) };
        let xs = [x, 0.0, cx];
        let ys = [y, 1.5];
        let s = loss_surface(&plane, &f, &xs, &ys).unwrap();
        prop_assert_eq!(s.values.dim(), (2, 3));
        for (j, &yy) in ys.iter().enumerate() {
            for (i, &xx) in xs.iter().enumerate() {
                let want = (xx - cx).powi(2) + (yy - cy).powi(2);
                prop_assert!((s.values[[j, i]] - want).abs() < 1e-9 * scale * scale);
            }
        }
    }
}

#[test]
fn bad_input_is_named() {
    let a = model(&[0.0; 8]);
    let b = model(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let c = model(&[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let e = Plane::through(&a, &b, &c).unwrap_err().to_string();
    assert!(e.contains("collinear"), "{e}");
    let e = Plane::through(&a, &a, &c).unwrap_err().to_string();
    assert!(e.contains("equal"), "{e}");
    let mut nan = model(&[0.5; 8]);
    nan.get_mut("b").unwrap()[[1]] = f64::NAN;
    let e = Plane::through(&a, &b, &nan).unwrap_err().to_string();
    assert!(e.contains("plane model c") && e.contains('b'), "{e}");
    let short = StateDict::from_pairs([("w", ArrayD::zeros(IxDyn(&[2, 3])))]).unwrap();
    assert!(Plane::through(&a, &b, &short).is_err());
    let c = model(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let plane = Plane::through(&a, &b, &c).unwrap();
    assert!(
        plane
            .point(0.0, f64::INFINITY)
            .unwrap_err()
            .to_string()
            .contains('y')
    );
    assert!(plane.grid(1, 0.1).unwrap_err().to_string().contains('n'));
    assert!(
        plane
            .grid(5, -0.1)
            .unwrap_err()
            .to_string()
            .contains("margin")
    );
    let f = |m: &Sd| -> Result<f64> { Ok(m.norm()) };
    assert!(loss_surface(&plane, &f, &[], &[0.0]).is_err());
    let fails = |_: &Sd| -> Result<f64> { Err(modelfusion::Error::invalid("loss", "boom")) };
    let e = loss_surface(&plane, &fails, &[0.0], &[0.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("boom"), "{e}");
}

#[cfg(feature = "plot")]
#[test]
fn surface_plots_draw_every_cell_and_refuse_bad_values() {
    use modelfusion::plot::SurfacePlot;
    let a = model(&[0.0; 8]);
    let b = model(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let c = model(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let plane = Plane::through(&a, &b, &c).unwrap();
    let (xs, ys) = plane.grid(7, 0.25).unwrap();
    let f = |m: &Sd| -> Result<f64> { Ok(1.0 + m.sub(&c)?.norm()) };
    let surface = loss_surface(&plane, &f, &xs, &ys).unwrap();
    let svg = SurfacePlot::new("plane", surface.clone())
        .with_names(["first", "second", "third"])
        .with_levels(5)
        .to_svg_string()
        .unwrap();
    assert!(svg.matches("<rect").count() >= 49, "one rectangle per cell");
    for name in ["first", "second", "third", "log-spaced"] {
        assert!(svg.contains(name), "{name}");
    }
    let e = SurfacePlot::new("plane", surface.clone())
        .with_levels(1)
        .to_svg_string();
    assert!(e.unwrap_err().to_string().contains("levels"));
    let mut bad = surface;
    bad.values[[2, 3]] = f64::NAN;
    let e = SurfacePlot::new("plane", bad)
        .to_svg_string()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("NaN") || e.contains("non-finite") || e.contains("finite"),
        "{e}"
    );
}
