//! The gRPC codec of every pushbus service: prost, with 256-byte starting
//! buffers. tonic's default allocates 8 KiB per stream up front, which was
//! most of the memory of an idle agent connection (an idle connection should cost under 10 KB);
//! buffers still grow for larger messages.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

const START: usize = 256;
/// tonic's default: yield to the runtime after this many buffered bytes.
const YIELD_THRESHOLD: usize = 32 * 1024;

pub struct SmallCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        SmallCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(START, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(START, YIELD_THRESHOLD))
    }
}
