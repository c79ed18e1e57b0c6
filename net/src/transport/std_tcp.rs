//! [`Transport`] over a `std::net::TcpStream` (cargo feature `std`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use super::{Transport, TransportError};

/// A TCP connection of the host operating system.
#[derive(Debug)]
pub struct StdTcp {
    stream: TcpStream,
}

/// The smallest timeout the operating system accepts (zero means "none" to `std`).
const MIN_TIMEOUT: Duration = Duration::from_micros(1);

fn map_err(e: io::Error) -> TransportError {
    use io::ErrorKind as K;
    match e.kind() {
        K::WouldBlock | K::TimedOut => TransportError::Timeout,
        K::ConnectionReset | K::ConnectionAborted => TransportError::Reset,
        K::BrokenPipe | K::UnexpectedEof | K::NotConnected => TransportError::Closed,
        K::ConnectionRefused => TransportError::Refused,
        K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
            TransportError::Unreachable
        }
        K::InvalidInput => TransportError::Invalid,
        _ => TransportError::Other,
    }
}

impl StdTcp {
    /// Connects to `addr` within `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<StdTcp, TransportError> {
        let stream =
            TcpStream::connect_timeout(&addr, timeout.max(MIN_TIMEOUT)).map_err(map_err)?;
        StdTcp::from_stream(stream)
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream) -> Result<StdTcp, TransportError> {
        stream.set_nodelay(true).map_err(map_err)?;
        Ok(StdTcp { stream })
    }

    /// The stream, e.g. for its addresses.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Ends this side of the stream (the peer reads [`TransportError::Closed`] after the data).
    pub fn close_write(&mut self) -> Result<(), TransportError> {
        self.stream.shutdown(Shutdown::Write).map_err(map_err)
    }
}

impl Transport for StdTcp {
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.stream
            .set_read_timeout(Some(timeout.max(MIN_TIMEOUT)))
            .map_err(map_err)?;
        loop {
            return match self.stream.read(buf) {
                Ok(0) => Err(TransportError::Closed),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(map_err(e)),
            };
        }
    }

    fn write(&mut self, buf: &[u8], timeout: Duration) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.stream
            .set_write_timeout(Some(timeout.max(MIN_TIMEOUT)))
            .map_err(map_err)?;
        loop {
            return match self.stream.write(buf) {
                Ok(0) => Err(TransportError::Closed),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(map_err(e)),
            };
        }
    }

    fn flush(&mut self, _timeout: Duration) -> Result<(), TransportError> {
        self.stream.flush().map_err(map_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};
    use std::thread;
    use std::vec;
    use std::vec::Vec;

    fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn bytes_cross_intact_both_ways_then_closed() {
        let (l, addr) = listener();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expect = data.clone();
        let server = thread::spawn(move || {
            let mut s = StdTcp::from_stream(l.accept().unwrap().0).unwrap();
            let mut got = vec![0u8; expect.len()];
            s.read_exact(&mut got, T).unwrap();
            assert!(got == expect);
            s.write_all(b"ok", T).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b, T), Err(TransportError::Closed));
        });
        let mut c = StdTcp::connect(addr, T).unwrap();
        c.write_all(&data, T).unwrap();
        c.flush(T).unwrap();
        let mut ok = [0u8; 2];
        c.read_exact(&mut ok, T).unwrap();
        assert_eq!(&ok, b"ok");
        c.close_write().unwrap();
        server.join().unwrap();
    }

    #[test]
    fn read_times_out_and_the_stream_stays_usable() {
        let (l, addr) = listener();
        let mut c = StdTcp::connect(addr, T).unwrap();
        let mut s = StdTcp::from_stream(l.accept().unwrap().0).unwrap();
        let mut b = [0u8; 4];
        let start = std::time::Instant::now();
        assert_eq!(
            c.read(&mut b, Duration::from_millis(50)),
            Err(TransportError::Timeout)
        );
        assert!(start.elapsed() >= Duration::from_millis(40));
        s.write_all(b"late", T).unwrap();
        c.read_exact(&mut b, T).unwrap();
        assert_eq!(&b, b"late");
    }

    #[test]
    fn refused_when_nothing_listens() {
        let (l, addr) = listener();
        drop(l);
        assert_eq!(
            StdTcp::connect(addr, T).unwrap_err(),
            TransportError::Refused
        );
    }

    #[test]
    fn early_end_of_stream_is_closed() {
        let (l, addr) = listener();
        let mut c = StdTcp::connect(addr, T).unwrap();
        let mut s = StdTcp::from_stream(l.accept().unwrap().0).unwrap();
        s.write_all(b"abc", T).unwrap();
        drop(s);
        let mut b = [0u8; 8];
        assert_eq!(c.read_exact(&mut b, T), Err(TransportError::Closed));
    }

    #[test]
    fn a_reset_is_reported() {
        let (l, addr) = listener();
        let mut c = StdTcp::connect(addr, T).unwrap();
        let (s, _) = l.accept().unwrap();
        // Unread data at close makes the kernel send RST instead of FIN.
        c.write_all(b"unread", T).unwrap();
        thread::sleep(Duration::from_millis(50));
        drop(s);
        thread::sleep(Duration::from_millis(50));
        let mut b = [0u8; 8];
        let r = c.read(&mut b, T);
        assert_eq!(r, Err(TransportError::Reset));
    }
}
