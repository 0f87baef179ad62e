package main

import (
	"bufio"
	"bytes"
	"net"
	"sync"
	"time"
)

// splitListener serves gRPC and HTTP/1.1 on one port, like Google's emulator:
// a connection that opens with the HTTP/2 client preface ("PRI * HTTP/2.0")
// goes to the gRPC server (h2c with prior knowledge, which is how gRPC
// clients talk to a plain-text endpoint), anything else to the REST server.
func splitListener(l net.Listener) (grpcL, httpL net.Listener) {
	g := newChanListener(l.Addr())
	h := newChanListener(l.Addr())
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Temporary() {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				g.close()
				h.close()
				return
			}
			go route(c, g, h)
		}
	}()
	return g, h
}

func route(c net.Conn, g, h *chanListener) {
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	head, err := br.Peek(3)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		_ = c.Close()
		return
	}
	pc := &peekedConn{Conn: c, r: br}
	if bytes.Equal(head, []byte("PRI")) {
		g.deliver(pc)
	} else {
		h.deliver(pc)
	}
}

type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) deliver(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		_ = c.Close()
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) close() { l.once.Do(func() { close(l.done) }) }

func (l *chanListener) Close() error {
	l.close()
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }
