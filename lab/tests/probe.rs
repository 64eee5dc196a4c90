//! The linear probe (logistic regression) against finite differences and separable data; the
//! probe's class-stratified split; sweep grids.

use lab::probe::{task, LinearProbe};
use rand::{Rng, SeedableRng};

/// The gradient of the probe's loss (mean softmax cross-entropy + L2) against central
/// finite differences.
#[test]
fn probe_gradient_matches_finite_differences() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (n, d, c) = (12, 5, 3);
    let z: Vec<Vec<f64>> = (0..n)
        .map(|_| (0..d).map(|_| rng.random_range(-2.0..2.0)).collect())
        .collect();
    let ys: Vec<usize> = (0..n).map(|i| i % c).collect();
    let w: Vec<f64> = (0..c * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let b: Vec<f64> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
    let (_, gw, gb) = LinearProbe::loss_and_grad(&w, &b, &z, &ys, c, 0.1);
    let h = 1e-6;
    for i in 0..w.len() {
        let (mut p, mut m) = (w.clone(), w.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (LinearProbe::loss_and_grad(&p, &b, &z, &ys, c, 0.1).0
            - LinearProbe::loss_and_grad(&m, &b, &z, &ys, c, 0.1).0)
            / (2.0 * h);
        assert!((fd - gw[i]).abs() < 1e-7, "w[{i}]: {} vs {fd}", gw[i]);
    }
    for i in 0..b.len() {
        let (mut p, mut m) = (b.clone(), b.clone());
        p[i] += h;
        m[i] -= h;
        let fd = (LinearProbe::loss_and_grad(&w, &p, &z, &ys, c, 0.1).0
            - LinearProbe::loss_and_grad(&w, &m, &z, &ys, c, 0.1).0)
            / (2.0 * h);
        assert!((fd - gb[i]).abs() < 1e-7, "b[{i}]: {} vs {fd}", gb[i]);
    }
    // By hand: at w = b = 0 every class has probability 1/c, the loss is ln c.
    let (l0, _, _) = LinearProbe::loss_and_grad(&vec![0.0; c * d], &vec![0.0; c], &z, &ys, c, 0.1);
    assert!((l0 - (c as f64).ln()).abs() < 1e-12);
}

/// Well-separated Gaussian classes are classified perfectly; labels that carry no information
/// are not (held-out accuracy near chance).
#[test]
fn probe_separates_separable_classes_and_not_noise() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let (c, d) = (4, 16);
    let centres: Vec<Vec<f32>> = (0..c)
        .map(|_| (0..d).map(|_| rng.random_range(-3.0..3.0)).collect())
        .collect();
    let sample = |rng: &mut rand_chacha::ChaCha8Rng, k: usize| -> Vec<f32> {
        centres[k]
            .iter()
            .map(|m| m + rng.random_range(-0.5..0.5))
            .collect()
    };
    let (xs, ys): (Vec<Vec<f32>>, Vec<usize>) =
        (0..80).map(|i| (sample(&mut rng, i % c), i % c)).unzip();
    let (tx, ty): (Vec<Vec<f32>>, Vec<usize>) =
        (0..40).map(|i| (sample(&mut rng, i % c), i % c)).unzip();
    let p = LinearProbe::fit(&xs, &ys, c, 1e-2, 400);
    assert_eq!(p.accuracy(&tx, &ty), 1.0);
    let noise: Vec<Vec<f32>> = (0..400)
        .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let labels: Vec<usize> = (0..400).map(|_| rng.random_range(0..c)).collect();
    let p = LinearProbe::fit(&noise[..300], &labels[..300], c, 1e-2, 400);
    let acc = p.accuracy(&noise[300..], &labels[300..]);
    assert!(
        acc < 0.45,
        "noise labels should stay near chance (0.25): {acc}"
    );
}

/// Every class with at least 2 utterances takes part with about a quarter held out (at least
/// one); classes of one utterance and unlabelled ones are left out; the split is reproducible.
#[test]
fn probe_split_is_stratified() {
    let ids: Vec<String> = (0..50).map(|i| format!("u{i:02}")).collect();
    let labels: Vec<Option<String>> = (0..50)
        .map(|i| {
            if i == 49 {
                None
            } else if i == 48 {
                Some("lonely".into())
            } else {
                Some(format!("c{}", i % 6))
            }
        })
        .collect();
    let t = task("speaker", &ids, &labels).unwrap();
    assert_eq!(t.classes.len(), 6);
    assert_eq!(t.labels[48], None);
    assert_eq!(t.labels[49], None);
    for c in 0..6 {
        let members: Vec<usize> = (0..50).filter(|&i| t.labels[i] == Some(c)).collect();
        let held = members.iter().filter(|&&i| t.test[i]).count();
        assert_eq!(members.len(), 8);
        assert_eq!(held, 2, "class {c}: every 4th of 8 held out");
    }
    let again = task("speaker", &ids, &labels).unwrap();
    assert_eq!(again.test, t.test);
    // Nothing to probe without two classes of two.
    assert!(task(
        "x",
        &ids[..3],
        &[Some("a".into()), Some("a".into()), Some("b".into())]
    )
    .is_none());
}

#[test]
fn sweep_grids_name_their_runs() {
    let a = lab::sweep::parse_axis("stages.student.with.alpha=[1, 0.5, 0.05]").unwrap();
    assert_eq!(a.path, "stages.student.with.alpha");
    assert_eq!(a.values.len(), 3);
    assert_eq!(
        lab::sweep::parse_axis("stages.mask.kind=mask.random")
            .unwrap()
            .values
            .len(),
        1
    );
    assert!(lab::sweep::parse_axis("alpha").is_err());
    assert!(lab::sweep::parse_axis("a..b=[1]").is_err());
    assert!(lab::sweep::parse_axis("a=[]").is_err());
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let b = lab::sweep::parse_axis("stages.mask.with.mask_prob=[0.3, 0.5]").unwrap();
    let runs = lab::sweep::plan(
        &[root.join("specs/tiny.yaml")],
        &[a, b],
        &[],
        std::path::Path::new("/tmp/s"),
    )
    .unwrap();
    assert_eq!(runs.len(), 6);
    assert_eq!(runs[0].name, "tiny-alpha=1-mask_prob=0.3");
    assert_eq!(runs[5].name, "tiny-alpha=0.05-mask_prob=0.5");
    assert_eq!(
        runs[5].run_dir,
        std::path::PathBuf::from("/tmp/s/tiny-alpha=0.05-mask_prob=0.5")
    );
    assert!(runs[5]
        .sets
        .contains(&"stages.student.with.alpha=0.05".to_string()));
    assert!(runs[5]
        .sets
        .contains(&"name=tiny-alpha=0.05-mask_prob=0.5".to_string()));
}
