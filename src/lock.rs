//! One way to take a mutex: a poisoned lock (a thread panicked while holding it) is taken
//! anyway. Every mutex here guards plain data that stays consistent between statements, and a
//! request must never fail because another one panicked.

use std::sync::{Mutex, MutexGuard};

/// Takes `m`, poisoned or not.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
