//! The agent's `trace` op: the agent is the install's one trace reader
//! (a [`Tracer`]) while any client traces, and hands each event to every
//! client that wants its pod and whose filter it passes. Any number of
//! clients can trace at once, different pods or the same; the kernel
//! programs emit for the union of their pods. The reader starts with the
//! first client and stops (tracing switched off) with the last.
//!
//! A client that reads too slowly loses lines (its queue holds
//! [`CLIENT_QUEUE`]), and is told how many in a `lost` line; events the
//! kernel could not queue (ring buffer full) are reported to the clients
//! of their pod the same way.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    pins::Pins,
    trace::{pods_of, Decoder, Filter, LostCounter, Selection, TraceLine, Tracer},
};

/// Lines queued per client before it loses some.
pub const CLIENT_QUEUE: usize = 4096;

struct Client {
    selection: Selection,
    filter: Filter,
    tx: mpsc::SyncSender<TraceLine>,
    dropped: Arc<AtomicU64>,
}

type Clients = Arc<Mutex<BTreeMap<u64, Client>>>;

struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct Hub {
    next: u64,
    reader: Option<Reader>,
}

/// Every `trace` client of the agent, and the reader serving them.
#[derive(Default)]
pub struct TraceHub {
    hub: Mutex<Hub>,
    clients: Clients,
}

/// One client's lines; unsubscribes when dropped.
pub struct Subscription<'a> {
    hub: &'a TraceHub,
    id: u64,
    pub rx: mpsc::Receiver<TraceLine>,
    /// Lines this client lost (its queue was full), not yet reported.
    pub dropped: Arc<AtomicU64>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TraceHub {
    /// Add a client; the reader starts if it is the first. Err when the
    /// install cannot be traced (no ring buffers, another reader, ...).
    pub fn subscribe(
        &self,
        pins: &Pins,
        selection: Selection,
        filter: Filter,
    ) -> Result<Subscription<'_>, String> {
        let mut hub = lock(&self.hub);
        let id = hub.next;
        hub.next += 1;
        let (tx, rx) = mpsc::sync_channel(CLIENT_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        lock(&self.clients).insert(
            id,
            Client {
                selection: selection.clone(),
                filter,
                tx,
                dropped: dropped.clone(),
            },
        );
        if hub.reader.is_none() {
            match start_reader(pins, selection, self.clients.clone()) {
                Ok(r) => hub.reader = Some(r),
                Err(e) => {
                    lock(&self.clients).remove(&id);
                    return Err(e);
                }
            }
        }
        Ok(Subscription {
            hub: self,
            id,
            rx,
            dropped,
        })
    }

    fn unsubscribe(&self, id: u64) {
        let mut hub = lock(&self.hub);
        let empty = {
            let mut c = lock(&self.clients);
            c.remove(&id);
            c.is_empty()
        };
        if empty {
            if let Some(r) = hub.reader.take() {
                r.stop.store(true, Ordering::SeqCst);
                let _ = r.thread.join();
            }
        }
    }

    /// Clients tracing now.
    pub fn clients(&self) -> usize {
        lock(&self.clients).len()
    }
}

/// The reader thread: it makes the [`Tracer`] (not `Send`: it maps the
/// ring buffer) and says whether that worked before it serves.
fn start_reader(pins: &Pins, first: Selection, clients: Clients) -> Result<Reader, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let pins = pins.clone();
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("trace".into())
        .spawn(move || {
            let mut tracer = match Tracer::start(&pins, first) {
                Ok(t) => {
                    let _ = ready_tx.send(Ok(()));
                    t
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            tracing::info!("tracing: reading the install's trace events");
            serve(&pins, &mut tracer, &clients, &stop2);
            drop(tracer);
            tracing::info!("tracing: stopped (switched off)");
        })
        .map_err(|e| format!("starting the trace reader: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Reader { stop, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err("the trace reader ended before it started".into())
        }
    }
}

fn serve(pins: &Pins, tracer: &mut Tracer, clients: &Clients, stop: &AtomicBool) {
    let mut decoder = Decoder::new(pins);
    let mut lost = LostCounter::new(pins, &pods_of(pins, tracer.selection()));
    let mut looked = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let want = Selection::union(lock(clients).values().map(|c| &c.selection));
        if &want != tracer.selection() {
            if let Err(e) = tracer.select(want) {
                tracing::warn!(error = %format!("{e:#}"), "tracing: could not change the traced pods");
            }
        }
        let events = match tracer.next_events(Duration::from_millis(250)) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "tracing: reading events failed");
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        let mut lines: Vec<TraceLine> = events.iter().map(|e| decoder.line(e)).collect();
        if looked.elapsed() >= Duration::from_secs(1) {
            looked = Instant::now();
            let pods = pods_of(pins, tracer.selection());
            for (cookie, n) in lost.new_losses(pins, &pods) {
                lines.push(decoder.lost(
                    cookie,
                    n,
                    "the kernel's ring buffer was full (ERRORS/trace_events_lost)",
                ));
            }
        }
        let clients = lock(clients);
        for c in clients.values() {
            let late = c.dropped.swap(0, Ordering::SeqCst);
            if late > 0 {
                let l = decoder.lost(0, late, "this client read too slowly");
                if c.tx.try_send(l).is_err() {
                    c.dropped.fetch_add(late, Ordering::SeqCst);
                }
            }
            for l in &lines {
                if !c.selection.wants(l.netns_cookie) || !c.filter.matches(l) {
                    continue;
                }
                if c.tx.try_send(l.clone()).is_err() {
                    c.dropped.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}
