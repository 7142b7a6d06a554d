//! `tally.v1.Tally` (`examples/proto/tally/v1/tally.proto`): a counter, the service of one's own
//! that `examples/own_service` serves beside the Greeter and `tests/it/own_service.rs` checks
//! every layer against. All it knows is counting: who may call it, how large and how long its
//! calls may be, how often a caller may call, and what is measured of them are the layers' business.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use tokio_stream::{Stream, StreamExt as _, wrappers::IntervalStream};
use tonic::{Request, Response, Status};

/// The generated code of `examples/proto/`, one module per package, written by `build.rs`.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/examples_protos.rs"));
}

use pb::tally::v1::{AddRequest, Total, WatchRequest, tally_server};

pub use pb::tally::v1::tally_server::TallyServer;

/// The encoded `FileDescriptorSet` of `examples/proto/`, for reflection, Connect and the tables.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("examples_descriptor");

/// The counter, shared by every caller; cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    total: Arc<AtomicI64>,
}

type Totals = Pin<Box<dyn Stream<Item = Result<Total, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl tally_server::Tally for Tally {
    async fn add(&self, request: Request<AddRequest>) -> Result<Response<Total>, Status> {
        let amount = request.into_inner().amount;
        let before = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                total.checked_add(amount)
            })
            .map_err(|total| Status::out_of_range(format!("{total} + {amount} overflows")))?;
        Ok(Response::new(Total {
            total: before + amount,
        }))
    }

    type WatchStream = Totals;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Totals>, Status> {
        let WatchRequest { count, interval_ms } = request.into_inner();
        // A zero period would make the interval panic: at most one total a millisecond.
        let every = Duration::from_millis(u64::from(interval_ms.max(1)));
        let total = Arc::clone(&self.total);
        let totals = IntervalStream::new(tokio::time::interval(every))
            .take(count as usize)
            .map(move |_| {
                Ok(Total {
                    total: total.load(Ordering::Acquire),
                })
            });
        Ok(Response::new(Box::pin(totals)))
    }
}
