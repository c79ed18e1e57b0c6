//! An Ethernet hub over UDP on the loopback interface: links emulated NICs that carry raw
//! Ethernet frames in UDP datagrams, one frame per datagram.
//!
//! Two emulators speak that way: Bochs' `ethmod=socket` (NIC bound to UDP port P on the host,
//! frames sent to 127.0.0.1:P+1) and QEMU's `-netdev dgram` (frames sent to `remote`, received
//! on `local`). Each node is one [`Link`]: the hub receives what the node sends on `bind` and
//! sends the other nodes' frames to `node`. Every frame goes to every other node (a hub, not a
//! learning switch: the NICs drop frames that are not for their MAC, and Bochs' `bxhub` learns
//! MACs only from broadcasts). Only loopback addresses are accepted.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;

/// One hub port: where the hub listens for a node's frames, and where that node listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub bind: SocketAddr,
    pub node: SocketAddr,
}

/// A bound, not yet running, hub.
pub struct Hub {
    ports: Arc<Vec<(UdpSocket, SocketAddr)>>,
}

/// Largest datagram accepted (an Ethernet frame is at most ~9 KiB even with jumbo frames).
const MAX_DATAGRAM: usize = 65536;

impl Hub {
    /// Binds every link's `bind` address. Fails on a non-loopback address.
    pub fn bind(links: &[Link]) -> io::Result<Hub> {
        let mut ports = Vec::with_capacity(links.len());
        for link in links {
            if !link.bind.ip().is_loopback() || !link.node.ip().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("hub links must stay on loopback: {link:?}"),
                ));
            }
            ports.push((UdpSocket::bind(link.bind)?, link.node));
        }
        Ok(Hub {
            ports: Arc::new(ports),
        })
    }

    /// The addresses the hub listens on, in link order (useful when binding port 0).
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.ports.iter().map(|(s, _)| s.local_addr()).collect()
    }

    /// Forwards frames until the process ends: one thread per link.
    pub fn spawn(self) -> Vec<thread::JoinHandle<()>> {
        (0..self.ports.len())
            .map(|i| {
                let ports = Arc::clone(&self.ports);
                thread::spawn(move || forward(&ports, i))
            })
            .collect()
    }
}

fn forward(ports: &[(UdpSocket, SocketAddr)], from: usize) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match ports[from].0.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ECONNREFUSED from an earlier send to a node not listening (yet): keep going.
            Err(_) => continue,
        };
        for (i, (socket, node)) in ports.iter().enumerate() {
            if i != from {
                // A node that is not listening loses the frame, as on a real wire.
                let _ = socket.send_to(&buf[..n], node);
            }
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use std::time::Duration;

    fn node() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn frames_reach_every_other_node_and_not_the_sender() {
        let nodes = [node(), node(), node()];
        let links: Vec<Link> = nodes
            .iter()
            .map(|n| Link {
                bind: "127.0.0.1:0".parse().unwrap(),
                node: n.local_addr().unwrap(),
            })
            .collect();
        let hub = Hub::bind(&links).unwrap();
        let hub_addrs = hub.local_addrs().unwrap();
        hub.spawn();

        let frame = b"\xff\xff\xff\xff\xff\xff\x52\x54\x00\x00\x01\x01\x08\x06payload";
        nodes[0].send_to(frame, hub_addrs[0]).unwrap();
        let mut buf = [0u8; 1600];
        for (k, n) in nodes.iter().enumerate().skip(1) {
            let (len, from) = n.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], frame, "node {k}");
            // Replies to the hub port that belongs to the receiving node.
            assert_eq!(from, hub_addrs[k]);
        }
        nodes[0]
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(
            nodes[0].recv_from(&mut buf).is_err(),
            "echoed to the sender"
        );
    }

    #[test]
    fn only_loopback_links() {
        let link = Link {
            bind: "0.0.0.0:0".parse().unwrap(),
            node: "127.0.0.1:9".parse().unwrap(),
        };
        assert!(Hub::bind(&[link]).is_err());
    }
}
