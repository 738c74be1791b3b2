package framework

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer answers every line it reads with the same line, until the
// test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// roundTrip writes line on c and reads the echo, with a deadline.
func roundTrip(c net.Conn, r *bufio.Reader, line string, deadline time.Duration) (string, error) {
	c.SetDeadline(time.Now().Add(deadline))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := r.ReadString('\n')
	return string(bytes.TrimSuffix([]byte(got), []byte("\n"))), err
}

// TestFaultProxy: the proxy forwards both ways unchanged; with latency the
// echo still comes back whole and in order (measured, not asserted, as the
// machine sets the pace); a blackhole swallows what is sent on an open
// connection and on a new one without refusing either; Heal closes the
// connections that crossed the blackhole, and a new one works again.
func TestFaultProxy(t *testing.T) {
	p := NewFaultProxy(t, "echo", echoServer(t))
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	if got, err := roundTrip(c, r, "plain", 5*time.Second); err != nil || got != "plain" {
		t.Fatalf("through the proxy: %q, %v; want the echo", got, err)
	}

	p.Set(NetFault{Latency: 20 * time.Millisecond, Jitter: 10 * time.Millisecond})
	start := time.Now()
	for i := range 5 {
		want := string(rune('a'+i)) + "-slow"
		if got, err := roundTrip(c, r, want, 10*time.Second); err != nil || got != want {
			t.Fatalf("with latency, round trip %d: %q, %v; want %q", i, got, err, want)
		}
	}
	t.Logf("5 round trips with 20 ms (+0–10 ms) each way: %s", time.Since(start).Round(time.Millisecond))

	p.Set(NetFault{Blackhole: true})
	if _, err := roundTrip(c, r, "lost", 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("through a blackhole on an open connection: %v, want a timeout", err)
	}
	c2, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatalf("a new connection during a blackhole was refused: %v; want it accepted and silent", err)
	}
	defer c2.Close()
	if _, err := roundTrip(c2, bufio.NewReader(c2), "lost too", 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("through a blackhole on a new connection: %v, want a timeout", err)
	}

	p.Heal()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.ReadString('\n'); err == nil {
		t.Errorf("a connection that crossed the blackhole still reads after Heal; want it closed")
	}
	c3, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	if got, err := roundTrip(c3, bufio.NewReader(c3), "healed", 5*time.Second); err != nil || got != "healed" {
		t.Errorf("after Heal: %q, %v; want the echo", got, err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
