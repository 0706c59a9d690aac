// Raw-slice API only (no ndarray feature): MiniLM ONNX -> mean pool -> L2 normalise vs tests/data/minilm-reference.json.
use ort::session::{Session, builder::GraphOptimizationLevel};
use ort::value::TensorRef;

fn embed(s: &mut Session, rows: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let (b, t) = (rows.len(), rows.iter().map(Vec::len).max().unwrap());
    let mut ids = vec![0i64; b * t];
    let mut mask = vec![0i64; b * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
        mask[i * t..i * t + r.len()].fill(1);
    }
    let types = vec![0i64; b * t];
    let out = s.run(ort::inputs![
        "input_ids" => TensorRef::from_array_view(([b, t], &ids[..]))?,
        "attention_mask" => TensorRef::from_array_view(([b, t], &mask[..]))?,
        "token_type_ids" => TensorRef::from_array_view(([b, t], &types[..]))?,
    ])?;
    let (shape, h) = out["last_hidden_state"].try_extract_tensor::<f32>()?;
    let hdim = shape[2] as usize;
    Ok((0..b).map(|i| {
        let mut e = vec![0f32; hdim];
        let n = rows[i].len();
        for j in 0..n { for k in 0..hdim { e[k] += h[(i * t + j) * hdim + k]; } }
        e.iter_mut().for_each(|x| *x /= n as f32);
        let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        e.iter_mut().for_each(|x| *x /= norm);
        e
    }).collect())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let (lib, model, refp) = (&a[1], &a[2], &a[3]);
    let env = ort::init_from(lib)?.build()?;
    let t0 = std::time::Instant::now();
    let mut s = Session::builder(&env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(1)?
        .commit_from_file(model)?;
    println!("session built in {:?}", t0.elapsed());
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(refp)?)?;
    let toks: Vec<Vec<i64>> = r["token_ids"].as_array().unwrap().iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()).collect();
    let want: Vec<Vec<f32>> = r["embeddings"].as_array().unwrap().iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()).collect();
    let diff = |got: &[Vec<f32>]| got.iter().zip(&want).flat_map(|(g, w)| g.iter().zip(w).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    let single: Vec<Vec<f32>> = toks.iter().map(|t| embed(&mut s, std::slice::from_ref(t)).map(|mut v| v.remove(0))).collect::<Result<_, _>>()?;
    println!("unbatched max abs diff {:.3e}", diff(&single));
    println!("padded batch max abs diff {:.3e}", diff(&embed(&mut s, &toks)?));
    let batch: Vec<Vec<i64>> = (0..32).map(|i| { let mut v = vec![101i64]; v.extend((0..11).map(|j| 1000 + ((i * 131 + j * 977) % 28000) as i64)); v.push(102); v }).collect();
    for _ in 0..3 { embed(&mut s, &batch)?; }
    let mut ts: Vec<f64> = (0..20).map(|_| { let t = std::time::Instant::now(); embed(&mut s, &batch).unwrap(); t.elapsed().as_secs_f64() * 1e3 }).collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("batch 32x13, 1 intra thread: median {:.1} ms, min {:.1} ms", ts[10], ts[0]);
    Ok(())
}
