package grpcserver

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/grpc/tap"
)

// TestCallDeadlineKeepsAnEarlierDeadline: a call whose client's deadline
// is no later than the bound keeps its context as it is (the same context,
// so the handler sees the client's deadline), without an allocation.
func TestCallDeadlineKeepsAnEarlierDeadline(t *testing.T) {
	h := callDeadline(time.Minute)
	parent, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	info := &tap.Info{FullMethodName: "/cairn.kms.v1.KMS/Decrypt"}
	got, err := h(parent, info)
	if err != nil || got != parent {
		t.Fatalf("tap handle on a call with a 1s deadline under a 1m bound = %v, %v; want its own context", got, err)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = h(parent, info) }); n != 0 {
		t.Errorf("tap handle on a call with a deadline within the bound: %v allocations, want 0", n)
	}
}

// TestCallDeadlineBoundsTheRest: a call without a deadline, or with one
// later than the bound, gets a child context whose deadline is the bound
// (at most now + limit) and which ends when the stream's context ends; a
// health watch keeps its context without a deadline.
func TestCallDeadlineBoundsTheRest(t *testing.T) {
	const limit = time.Minute
	h := callDeadline(limit)
	info := &tap.Info{FullMethodName: "/cairn.kms.v1.KMS/Decrypt"}
	later, cancelLater := context.WithTimeout(context.Background(), time.Hour)
	defer cancelLater()
	for name, parent := range map[string]context.Context{"no deadline": context.Background(), "a later deadline": later} {
		t.Run(name, func(t *testing.T) {
			stream, end := context.WithCancel(parent)
			defer end()
			before := time.Now()
			got, err := h(stream, info)
			if err != nil {
				t.Fatal(err)
			}
			d, ok := got.Deadline()
			if !ok || d.Before(before.Add(limit)) || d.After(time.Now().Add(limit)) {
				t.Errorf("deadline = %v, %v; want now + %v", d, ok, limit)
			}
			end()
			<-got.Done() // the stream's end ends the bounded context
			if !errors.Is(got.Err(), context.Canceled) {
				t.Errorf("bounded context after the stream ended: %v, want Canceled", got.Err())
			}
		})
	}
	watch := context.Background()
	if got, err := h(watch, &tap.Info{FullMethodName: healthWatch}); err != nil || got != watch {
		t.Errorf("tap handle on a health watch = %v, %v; want its own context, without a deadline", got, err)
	}
}

// TestConnLimitCountsPerAddress: connections are counted per IP address
// (an IPv4-mapped IPv6 address is its IPv4 one), one past the bound is
// refused until one of its address is released, and connections not over
// IP are not counted.
func TestConnLimitCountsPerAddress(t *testing.T) {
	l, err := newConnLimit(2, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 1000}
	mapped := &net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 1001}
	b := &net.TCPAddr{IP: net.ParseIP("192.0.2.2"), Port: 1000}
	ip1, ok1 := l.acquire(a)
	_, ok2 := l.acquire(mapped)
	if !ok1 || !ok2 {
		t.Fatalf("first two connections of 192.0.2.1: %v, %v; want both counted", ok1, ok2)
	}
	if _, ok := l.acquire(a); ok {
		t.Errorf("third connection of 192.0.2.1 (one IPv4-mapped) accepted, want refused at 2")
	}
	if _, ok := l.acquire(b); !ok {
		t.Errorf("first connection of 192.0.2.2 refused, want accepted")
	}
	if ip1 != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("address counted = %v, want 192.0.2.1", ip1)
	}
	l.release(ip1)
	if _, ok := l.acquire(a); !ok {
		t.Errorf("connection of 192.0.2.1 after one was released refused, want accepted")
	}
	for range 3 {
		if _, ok := l.acquire(&net.UnixAddr{Name: "@cairn", Net: "unix"}); !ok {
			t.Errorf("Unix socket connection refused, want it not counted")
		}
	}
}

// BenchmarkCallDeadline is the tap handle's cost per call: a client's
// deadline within the bound (every Cairn client's) and none.
func BenchmarkCallDeadline(b *testing.B) {
	h := callDeadline(DefaultMaxCallDuration)
	info := &tap.Info{FullMethodName: "/cairn.kms.v1.KMS/Decrypt"}
	b.Run("client deadline within the bound", func(b *testing.B) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b.ReportAllocs()
		for b.Loop() {
			_, _ = h(ctx, info)
		}
	})
	b.Run("no client deadline", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			stream, end := context.WithCancel(context.Background())
			_, _ = h(stream, info)
			end()
		}
	})
}
