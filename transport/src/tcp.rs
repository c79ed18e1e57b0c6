//! [`TcpPipe`]: a [`Pipe`] over a non-blocking `std::net::TcpStream`, for host tests and tools.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::{Pipe, PipeError};

/// A connected TCP stream in non-blocking mode, with Nagle off (request/response protocols).
#[derive(Debug)]
pub struct TcpPipe {
    stream: TcpStream,
}

impl TcpPipe {
    /// Connects (blocking, at most `timeout`), then switches the stream to non-blocking mode.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<TcpPipe> {
        let mut last = io::Error::new(ErrorKind::InvalidInput, "no address to connect to");
        for addr in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => return TcpPipe::from_stream(stream),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream) -> io::Result<TcpPipe> {
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        Ok(TcpPipe { stream })
    }

    /// The stream underneath (to shut it down in a test, say).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn pipe_error(error: &io::Error) -> PipeError {
    match error.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            PipeError::Reset
        }
        ErrorKind::UnexpectedEof | ErrorKind::NotConnected => PipeError::Closed,
        _ => PipeError::Other,
    }
}

impl Pipe for TcpPipe {
    fn send(&mut self, data: &[u8]) -> Result<usize, PipeError> {
        if data.is_empty() {
            return Ok(0);
        }
        match self.stream.write(data) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(e) => Err(pipe_error(&e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, PipeError> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.stream.read(buf) {
            Ok(0) => Err(PipeError::Closed),
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(0),
            Err(e) => Err(pipe_error(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    #[test]
    fn bytes_cross_and_a_close_is_reported_after_them() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpPipe::connect(addr, Duration::from_secs(5)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut server = TcpPipe::from_stream(server).unwrap();

        assert_eq!(client.send(b"hello").unwrap(), 5);
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = std::vec::Vec::new();
        let mut buf = [0u8; 16];
        let end = loop {
            assert!(Instant::now() < deadline, "no close seen");
            match server.recv(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"hello");
        assert_eq!(end, PipeError::Closed);
    }

    #[test]
    fn an_empty_pipe_reads_zero_without_blocking() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client =
            TcpPipe::connect(listener.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let _server = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(client.recv(&mut buf).unwrap(), 0);
        assert_eq!(client.send(&[]).unwrap(), 0);
    }
}
