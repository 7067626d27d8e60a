//! `Value` and `Array`, as in Python's documentation for `multiprocessing.Value`/`Array`:
//!
//! ```python
//! def f(n, a):
//!     n.value = 3.1415927
//!     for i in range(len(a)):
//!         a[i] = -a[i]
//!
//! num = Value('d', 0.0)
//! arr = Array('i', range(10))
//! p = Process(target=f, args=(num, arr))
//! p.start(); p.join()
//! print(num.value)   # 3.1415927 (here: std::f64::consts::PI)
//! print(arr[:])      # [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]
//! ```
//!
//! Run: `cargo run --example value_array`.

use multiproc::{Array, Process, Value};

fn f((n, a): (Value<f64>, Array<i32>)) {
    n.set(std::f64::consts::PI).expect("set");
    let mut a = a.lock().expect("lock");
    for x in a.iter_mut() {
        *x = -*x;
    }
}

fn main() -> multiproc::Result<()> {
    multiproc::init();
    let num = Value::new(0.0f64)?;
    let arr = Array::from_slice(&(0..10).collect::<Vec<i32>>())?;
    let mut p = Process::new(f, (num.clone(), arr.clone()));
    p.start()?;
    p.join()?;
    println!("{}", num.get()?);
    println!("{:?}", arr.to_vec()?);
    Ok(())
}
