package tests

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/grpcserver"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms"
	distributorv1 "github.com/cairnkms/cairn/proto/cairn/distributor/v1"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// lorisClient is the identity the slow-loris streams call as: a valid
// client of the region, apart from the well-behaved one (kmsClient), so that
// the KMS server's per-caller quota is not shared between them.
const lorisClient = "client/us-east/loris"

// row40Chain is the smallest whole chain (startOneRegionChain) serving
// ledgerTeam, with the KMS server's ops listener (/metrics) at ops.
type row40Chain struct {
	*oneRegionChain
	kms *framework.KMSServer
	ops string
}

// startRow40Chain is startOneRegionChain with the KMS server's ops listener
// on and kmsArgs on its command line, and the loris client's identity
// minted.
func startRow40Chain(t *testing.T, kmsArgs ...string) *row40Chain {
	t.Helper()
	ops := fmt.Sprintf("127.0.0.1:%d", framework.FreePorts(t, 1)[0])
	c := startOneRegionChain(t, oneRegion{team: ledgerTeam, kmsArgs: append([]string{"--metrics-listen", ops}, kmsArgs...)})
	c.w.Mint(lorisClient)
	return &row40Chain{oneRegionChain: c, kms: c.k, ops: ops}
}

// row40Padded returns m with an unknown bytes field added so that its encoding
// is exactly size bytes. Servers skip unknown fields, so the padding changes
// only the request's size on the wire.
func row40Padded[M proto.Message](t *testing.T, m M, size int) M {
	t.Helper()
	base := proto.Size(m)
	const field = 1000 // no Cairn message has a field this high
	for n := size - base - protowire.SizeTag(field) - 1; n >= 0; n-- {
		if base+protowire.SizeTag(field)+protowire.SizeBytes(n) == size {
			out := proto.Clone(m).(M)
			raw := protowire.AppendBytes(protowire.AppendTag(nil, field, protowire.BytesType), make([]byte, n))
			out.ProtoReflect().SetUnknown(append(out.ProtoReflect().GetUnknown(), raw...))
			if got := proto.Size(out); got != size {
				t.Fatalf("padded %T is %d bytes, want %d", m, got, size)
			}
			return out
		}
	}
	t.Fatalf("cannot pad a %d-byte %T to exactly %d bytes", base, m, size)
	var zero M
	return zero
}

// row40Nested returns m with depth nested unknown groups (field 15, one
// byte per tag) added: 2 x depth bytes that every protobuf parser must
// recurse into to skip.
func row40Nested[M proto.Message](m M, depth int) M {
	out := proto.Clone(m).(M)
	b := make([]byte, 0, 2*depth)
	for range depth {
		b = protowire.AppendTag(b, 15, protowire.StartGroupType)
	}
	for range depth {
		b = protowire.AppendTag(b, 15, protowire.EndGroupType)
	}
	out.ProtoReflect().SetUnknown(append(out.ProtoReflect().GetUnknown(), b...))
	return out
}

// row40DeepNesting is how deep the nesting attacks go: ten times protobuf-go's
// recursion limit, and 200 KB on the wire.
const row40DeepNesting = 100_000

// TestOversizeAndDeepNestingRefused is row 40 (a) and (b) on the real
// processes. (a): a request of exactly the server's receive limit is served,
// one byte more is refused by gRPC with RESOURCE_EXHAUSTED naming the
// limit, on the root KMS (rootkms.MaxMessageSize, 16 MiB) and on the
// distributor (grpcserver's 64 KiB default). (b): a request under the limit
// holding deeply nested unknown groups is refused with gRPC's INTERNAL
// "failed to unmarshal" (protobuf-go's "cannot parse invalid wire-format
// data": its recursion limit is protowire.DefaultRecursionLimit, 10000, so
// 10001 levels still parse and 10002 do not), on the KMS data plane (Decrypt,
// and DecryptBatch, whose fast decoder hands the request to protobuf), the
// root KMS and the distributor. After every refused request the same server
// answers the next call and its process is still running.
//
// The chain's secret scan (oneRegionChain.requireNoSecrets) ends it.
func TestOversizeAndDeepNestingRefused(t *testing.T) {
	c := startRow40Chain(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	alive := func(p *framework.Process, what string) {
		t.Helper()
		if !p.Running() {
			exited, err := p.Exited()
			t.Fatalf("%s: the server process is gone (exited %v: %v)", what, exited, err)
		}
	}

	root := c.root.Client(framework.Regionctl)
	getRegion := &rootkmsv1.GetRegionRequest{Region: kmsRegion}
	rootServes := func(what string) {
		t.Helper()
		alive(c.root.Process, what)
		if r, err := root.GetRegion(ctx, getRegion); err != nil || r.GetName() != kmsRegion {
			t.Fatalf("root KMS after %s: GetRegion = %v, %v; want region %s", what, r, err, kmsRegion)
		}
	}
	dist, conn := c.d.Dial(framework.Observer)
	defer conn.Close()
	distServes := func(what string) {
		t.Helper()
		alive(c.d.Process, what)
		if st, err := dist.GetStatus(ctx, &distributorv1.GetStatusRequest{}); err != nil || st.GetState() != unsealed {
			t.Fatalf("distributor after %s: GetStatus = %v, %v; want UNSEALED", what, st.GetState(), err)
		}
	}
	kmsServes := func(what string) {
		t.Helper()
		alive(c.kms.Process, what)
		if err := roundTrip(c.kms, c.kms, []byte("row 40 after "+what), nil); err != nil {
			t.Fatalf("KMS after %s: %v", what, err)
		}
	}
	requireTooLarge := func(what string, err error, limit int) {
		t.Helper()
		st, _ := status.FromError(err)
		if st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), fmt.Sprint(limit)) {
			t.Errorf("%s: %v, want RESOURCE_EXHAUSTED naming the limit %d", what, err, limit)
		}
	}
	requireUnparsable := func(what string, err error) {
		t.Helper()
		st, _ := status.FromError(err)
		if st.Code() != codes.Internal || !strings.Contains(st.Message(), "failed to unmarshal") ||
			!strings.Contains(st.Message(), "cannot parse invalid wire-format data") {
			t.Errorf("%s: %v, want INTERNAL: grpc: failed to unmarshal the received message: proto: cannot parse invalid wire-format data", what, err)
		}
	}

	// (a) The root KMS: its limit is rootkms.MaxMessageSize.
	rootMax := rootkmsclient.MaxMessageSize
	if r, err := root.GetRegion(ctx, row40Padded(t, getRegion, rootMax)); err != nil || r.GetName() != kmsRegion {
		t.Errorf("root KMS: GetRegion of exactly %d bytes = %v, %v; want the region", rootMax, r, err)
	}
	_, err := root.GetRegion(ctx, row40Padded(t, getRegion, rootMax+1))
	requireTooLarge(fmt.Sprintf("root KMS: GetRegion of %d bytes", rootMax+1), err, rootMax)
	t.Logf("root KMS, %d-byte request: %v", rootMax+1, err)
	rootServes("an oversized request")

	// (a) The distributor: grpcserver's default.
	distMax := grpcserver.DefaultMaxRecvMsgSize
	if st, err := dist.GetStatus(ctx, row40Padded(t, &distributorv1.GetStatusRequest{}, distMax)); err != nil || st.GetState() != unsealed {
		t.Errorf("distributor: GetStatus of exactly %d bytes = %v, %v; want UNSEALED", distMax, st.GetState(), err)
	}
	_, err = dist.GetStatus(ctx, row40Padded(t, &distributorv1.GetStatusRequest{}, distMax+1))
	requireTooLarge(fmt.Sprintf("distributor: GetStatus of %d bytes", distMax+1), err, distMax)
	t.Logf("distributor, %d-byte request: %v", distMax+1, err)
	distServes("an oversized request")

	// (b) Where protobuf-go's limit lies, on the root KMS: 10001 levels
	// parse (and are ignored), 10002 do not.
	limit := protowire.DefaultRecursionLimit
	if r, err := root.GetRegion(ctx, row40Nested(getRegion, limit+1)); err != nil || r.GetName() != kmsRegion {
		t.Errorf("root KMS: GetRegion with %d nested groups = %v, %v; want the region (within protobuf's limit)", limit+1, r, err)
	}
	_, err = root.GetRegion(ctx, row40Nested(getRegion, limit+2))
	requireUnparsable(fmt.Sprintf("root KMS: GetRegion with %d nested groups", limit+2), err)

	// (b) 10^5 levels: the root KMS, the KMS data plane.
	_, err = root.GetRegion(ctx, row40Nested(getRegion, row40DeepNesting))
	requireUnparsable(fmt.Sprintf("root KMS: GetRegion with %d nested groups", row40DeepNesting), err)
	t.Logf("root KMS, %d nested groups: %v", row40DeepNesting, err)
	rootServes("deep nesting")

	kc := c.kms.Client(kmsClient)
	_, err = kc.Decrypt(ctx, row40Nested(&kmsv1.DecryptRequest{Keyset: kmsKeyset, Ciphertext: []byte("x")}, row40DeepNesting))
	requireUnparsable(fmt.Sprintf("KMS: Decrypt with %d nested groups", row40DeepNesting), err)
	t.Logf("KMS Decrypt, %d nested groups: %v", row40DeepNesting, err)
	kmsServes("a deeply nested Decrypt")
	_, err = kc.DecryptBatch(ctx, row40Nested(&kmsv1.DecryptBatchRequest{Keyset: kmsKeyset}, row40DeepNesting))
	requireUnparsable(fmt.Sprintf("KMS: DecryptBatch with %d nested groups", row40DeepNesting), err)
	kmsServes("a deeply nested DecryptBatch")

	// (b) The distributor: as deep as fits in its 64 KiB, still past
	// protobuf's limit.
	distDepth := (distMax - 16) / 2
	_, err = dist.GetStatus(ctx, row40Nested(&distributorv1.GetStatusRequest{}, distDepth))
	requireUnparsable(fmt.Sprintf("distributor: GetStatus with %d nested groups", distDepth), err)
	distServes("deep nesting")

	// Logged for the record: gRPC refuses these before any interceptor
	// runs (the request is read before the handler's interceptors), so
	// whether the audit log saw them depends on that order.
	refused := 0
	for _, r := range c.root.Audit() {
		if strings.HasSuffix(r.Operation, "/GetRegion") && (r.Code == codes.ResourceExhausted.String() || r.Code == codes.Internal.String()) {
			refused++
		}
	}
	t.Logf("root KMS audit log: %d records of the 3 refused GetRegion calls (oversized, nested)", refused)
	c.requireNoSecrets(t, nil)
}

// Bounds of the slow-loris test.
const (
	// lorisN is how many attackers of each kind run at once: connections
	// trickling a ClientHello, connections that finish TLS and send no
	// HTTP/2 preface, and streams that never finish their request.
	lorisN = 50
	// lorisCutGuard is how long an attack connection may stay open before
	// the test calls it not cut: far above the handshake bound
	// (grpcserver.DefaultHandshakeTimeout), so that it waits for the cut
	// and does not time it, and far below gRPC's own 120 s.
	lorisCutGuard = grpcserver.DefaultHandshakeTimeout + 30*time.Second
	// lorisTrips bounds the good client's round trips during the attack.
	lorisTrips = 4000
	// lorisGoroutinesPerAttacker bounds what one attacker may cost the
	// server in goroutines. grpc-go spends one goroutine on a connection
	// in its handshake, three on an established HTTP/2 connection (reader,
	// writer, keepalive) and one on a stream in its handler; four per
	// attacker covers the worst of them with room to spare, and a leak of
	// a goroutine per trickled byte or per retry would exceed it.
	lorisGoroutinesPerAttacker = 4
	// lorisRSSPerAttacker bounds what one attacker may cost the server in
	// resident memory: an established connection holds a TLS conn with
	// its record buffers (about 16 KiB each way), gRPC's 32 KiB read and
	// 32 KiB write buffers, an HPACK table and a goroutine stack; a stream
	// a few KiB more. 512 KiB is several times that; an attack that could
	// make the server buffer an unbounded request would exceed it.
	lorisRSSPerAttacker = 512 << 10
	// lorisFloodStreams is how many body-less health checks the stream
	// flooder opens on its one connection: twice what the server lets one
	// connection hold (grpcserver.DefaultMaxConcurrentStreams).
	lorisFloodStreams = 2 * grpcserver.DefaultMaxConcurrentStreams
	// lorisGoroutinesPerStream and lorisRSSPerStream bound what one stream
	// the flooder holds open may cost the server: a handler goroutine
	// blocked reading the request, and its stream state and stack (about
	// 12 KiB measured); 2 goroutines and 64 KiB leave room.
	lorisGoroutinesPerStream = 2
	lorisRSSPerStream        = 64 << 10
	// lorisSettle is how many goroutines above its baseline the server may
	// keep once the attackers are gone (timers, a pooled worker or two).
	lorisSettle = 25
)

// TestSlowLorisKMS is row 40 (c) on a real KMS server process. Four kinds
// of slow-loris attackers run at once: lorisN TCP connections that trickle
// a real ClientHello one byte a second; lorisN connections that finish the
// mTLS handshake (a valid client certificate) and never send the HTTP/2
// preface; lorisN Decrypt streams of a valid client (lorisClient), each on a
// connection of its own, that never finish their request (half send no
// message at all, through grpc-go's own client; half, over raw HTTP/2, a
// gRPC frame header announcing 64 MiB, the server's receive limit, and only
// 8 bytes of it); and one connection of lorisClient opening
// lorisFloodStreams body-less health checks. Meanwhile a well-behaved client
// (kmsClient) does bounded Encrypt + Decrypt round trips.
//
// Asserted: the good client sees no error before, during or after the
// attack; every connection of the first two kinds is closed by the server
// (EOF or reset seen by the attacker, not a TLS alert) before lorisCutGuard;
// the flooded connection is held to grpcserver.DefaultMaxConcurrentStreams
// (advertised in SETTINGS, every stream past it refused with
// REFUSED_STREAM); while the attack runs the server's go_goroutines stays
// below its baseline + lorisGoroutinesPerAttacker per attacker +
// lorisGoroutinesPerStream per flood stream held, and its RSS (VmRSS) below
// its baseline + lorisRSSPerAttacker per attacker + lorisRSSPerStream per
// flood stream held; once the attackers are gone, go_goroutines comes back
// to within lorisSettle of its baseline.
//
// Logged, not asserted (house rule: no timed assertions): the good client's
// p50 and p99 before, during and after the attack, when each attack
// connection was cut, and whether the server still holds the unfinished
// Decrypt streams (cairn_kms_data_in_flight) after the handshake bound has
// passed. RSS after the attack is logged, not asserted: the KMS server
// locks its memory (lockedmem, mlock), so a page once touched stays
// resident, and its heap shrinks only at its next GC (GOGC=400).
//
// The chain's secret scan (oneRegionChain.requireNoSecrets) ends it.
func TestSlowLorisKMS(t *testing.T) {
	c := startRow40Chain(t)
	pid := c.kms.PID()

	// Baseline: the good client warms up its connection first.
	trips := func(n int) (lat []time.Duration, errs []error) {
		for i := range n {
			t0 := time.Now()
			if err := roundTrip(c.kms, c.kms, fmt.Appendf(nil, "row 40 trip %d", i), nil); err != nil {
				errs = append(errs, err)
			}
			lat = append(lat, time.Since(t0))
		}
		return lat, errs
	}
	if _, errs := trips(20); len(errs) > 0 {
		t.Fatalf("warm-up round trips failed: %v", errs)
	}
	before, errs := trips(400)
	if len(errs) > 0 {
		t.Fatalf("%d of %d round trips before the attack failed, first: %v", len(errs), len(before), errs[0])
	}
	base, err := lorisSampleServer(c.ops, pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("baseline: %s; good client p50 %s, p99 %s over %d round trips", base, lorisQuantile(before, 0.5), lorisQuantile(before, 0.99), len(before))

	hello, err := lorisClientHello(c.w.Source(lorisClient))
	if err != nil {
		t.Fatal(err)
	}
	attackCtx, stopAttack := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stopAttack() // runs before wg.Wait

	// The handshake attackers: each reports when the server cut it.
	type cut struct {
		kind    string
		after   time.Duration
		err     error // why the attacker saw its connection end
		stillUp bool  // open at lorisCutGuard
	}
	cuts := make(chan cut, 2*lorisN)
	lorisSrc := c.w.Source(lorisClient)
	kmsOnly, err := identity.ParseAllowlist(lorisSrc.TrustDomain(), "kms/us-east/*")
	if err != nil {
		t.Fatal(err)
	}
	creds := identity.ClientCredentials(lorisSrc, kmsOnly.Authorize)
	for i := range 2 * lorisN {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kind := "trickled ClientHello"
			if i%2 == 1 {
				kind = "TLS done, no HTTP/2 preface"
			}
			start := time.Now()
			raw, err := (&net.Dialer{}).DialContext(attackCtx, "tcp", c.kms.Addr)
			if err != nil {
				cuts <- cut{kind: kind, err: fmt.Errorf("dial: %w", err)}
				return
			}
			defer raw.Close()
			var end error
			if i%2 == 0 {
				end = lorisTrickle(attackCtx, raw, hello, start.Add(lorisCutGuard))
			} else {
				end = lorisHandshakeThenWait(attackCtx, raw, creds, start.Add(lorisCutGuard))
			}
			cuts <- cut{kind: kind, after: time.Since(start), err: end, stillUp: lorisTimedOut(end)}
		}()
	}

	// The stream attackers: half through grpc-go, half raw HTTP/2. Each
	// holds its call open until the attack ends.
	streamsOpen := make(chan error, lorisN)
	for i := range lorisN {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				conn, err := lorisBodylessStream(attackCtx, c)
				streamsOpen <- err
				if err == nil {
					<-attackCtx.Done()
					conn.Close()
				}
				return
			}
			conn, err := lorisPartialBodyStream(attackCtx, c.kms.Addr, creds)
			streamsOpen <- err
			if err == nil {
				// Drain what the server sends (SETTINGS, pings, window
				// updates) so that it never blocks on us.
				stop := context.AfterFunc(attackCtx, func() { conn.Close() })
				_, _ = io.Copy(io.Discard, conn)
				if stop() {
					conn.Close()
				}
			}
		}()
	}
	for range lorisN {
		if err := <-streamsOpen; err != nil {
			t.Fatalf("opening a slow-loris stream: %v", err)
		}
	}

	// The stream flooder: one connection, lorisFloodStreams body-less calls.
	flood, err := lorisStreamFlood(attackCtx, c.kms.Addr, creds, lorisFloodStreams)
	if err != nil {
		t.Fatalf("stream flood: %v", err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		stop := context.AfterFunc(attackCtx, func() { flood.conn.Close() })
		_, _ = io.Copy(io.Discard, flood.conn)
		if stop() {
			flood.conn.Close()
		}
	}()
	held := lorisFloodStreams - flood.refused
	if flood.maxStreams != grpcserver.DefaultMaxConcurrentStreams || held != grpcserver.DefaultMaxConcurrentStreams {
		t.Errorf("%d body-less calls on one connection: the server advertised %d streams and held %d, want %d and %d",
			lorisFloodStreams, flood.maxStreams, held, grpcserver.DefaultMaxConcurrentStreams, grpcserver.DefaultMaxConcurrentStreams)
	}
	t.Logf("stream flood: %d body-less health checks on one connection, %d refused (REFUSED_STREAM), %d held", lorisFloodStreams, flood.refused, held)

	// The good client works while the attack runs; the server is sampled
	// after every 20 round trips.
	attackStart := time.Now()
	var during []time.Duration
	peak := base
	var samples int
	handshakesDone := make(chan []cut, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		var all []cut
		for range 2 * lorisN {
			all = append(all, <-cuts)
		}
		handshakesDone <- all
	}()
	var allCuts []cut
	// Round trips in batches of 20, paced so that they span the whole
	// attack, until every handshake attacker has ended (or the count
	// bound).
	for len(during) < lorisTrips && allCuts == nil {
		lat, errs := trips(20)
		during = append(during, lat...)
		if len(errs) > 0 {
			t.Errorf("%d of %d round trips during the attack failed, first: %v", len(errs), len(lat), errs[0])
		}
		s, err := lorisSampleServer(c.ops, pid)
		if err != nil {
			t.Fatal(err)
		}
		peak, samples = peak.max(s), samples+1
		select {
		case allCuts = <-handshakesDone:
		case <-time.After(100 * time.Millisecond):
		}
	}
	if allCuts == nil {
		// The good client reached its bound first: the rest of the attack
		// is only waited for (each attacker ends by lorisCutGuard).
		allCuts = <-handshakesDone
	}
	s, err := lorisSampleServer(c.ops, pid)
	if err != nil {
		t.Fatal(err)
	}
	peak = peak.max(s)
	t.Logf("during the attack (%s, %d samples): peak %s; good client p50 %s, p99 %s over %d round trips",
		time.Since(attackStart).Round(time.Millisecond), samples+1, peak, lorisQuantile(during, 0.5), lorisQuantile(during, 0.99), len(during))
	// A call whose request never arrives holds its stream until the
	// server's per-call bound (grpcserver.DefaultMaxCallDuration, 30 s;
	// TestWithheldCallsCutAtKMSCallCap asserts the cut) and no admission
	// slot (the KMS reads a data-plane request before admitting it): the
	// count shows the slots they hold.
	t.Logf("after the handshake attackers were cut: cairn_kms_data_in_flight = %v (%d slow-loris streams open, none with a deadline of its own)", s.inFlight, lorisN)

	byKind := map[string][]time.Duration{}
	for _, ct := range allCuts {
		switch {
		case ct.stillUp:
			t.Errorf("%s connection still open after %s (%v): the server did not cut it", ct.kind, lorisCutGuard, ct.err)
		case !lorisCut(ct.err):
			t.Errorf("%s connection ended with %v after %s, want EOF or a reset from the server", ct.kind, ct.err, ct.after)
		}
		byKind[ct.kind] = append(byKind[ct.kind], ct.after)
	}
	for kind, d := range byKind {
		slices.Sort(d)
		t.Logf("%d %s connections cut by the server after %s .. %s", len(d), kind, d[0].Round(time.Millisecond), d[len(d)-1].Round(time.Millisecond))
	}

	attackers := 3*lorisN + 1
	if max := base.goroutines + lorisGoroutinesPerAttacker*attackers + lorisGoroutinesPerStream*held; peak.goroutines > max {
		t.Errorf("go_goroutines peaked at %d under %d attackers holding %d flood streams, want at most %d (baseline %d + %d per attacker + %d per stream)",
			peak.goroutines, attackers, held, max, base.goroutines, lorisGoroutinesPerAttacker, lorisGoroutinesPerStream)
	}
	if max := base.rss + int64(lorisRSSPerAttacker*attackers+lorisRSSPerStream*held); peak.rss > max {
		t.Errorf("VmRSS peaked at %d MiB under %d attackers holding %d flood streams, want at most %d MiB (baseline %d MiB + %d KiB per attacker + %d KiB per stream)",
			peak.rss>>20, attackers, held, max>>20, base.rss>>20, lorisRSSPerAttacker>>10, lorisRSSPerStream>>10)
	}

	// The attackers go away: the server lets go of what they held.
	stopAttack()
	wg.Wait()
	after, err := lorisWaitSettled(c.ops, pid, base.goroutines+lorisSettle, time.Minute)
	if err != nil {
		t.Error(err)
	}
	last, errs := trips(400)
	if len(errs) > 0 {
		t.Errorf("%d of %d round trips after the attack failed, first: %v", len(errs), len(last), errs[0])
	}
	t.Logf("after the attack: %s; good client p50 %s, p99 %s over %d round trips", after, lorisQuantile(last, 0.5), lorisQuantile(last, 0.99), len(last))
	c.requireNoSecrets(t, nil)
}

// lorisSample is one look at the KMS server process.
type lorisSample struct {
	goroutines int
	rss        int64 // VmRSS, bytes
	heapInuse  int64
	inFlight   float64
}

func (s lorisSample) String() string {
	return fmt.Sprintf("%d goroutines, VmRSS %.1f MiB, heap in use %.1f MiB, %v data-plane calls in flight",
		s.goroutines, float64(s.rss)/(1<<20), float64(s.heapInuse)/(1<<20), s.inFlight)
}

func (s lorisSample) max(o lorisSample) lorisSample {
	return lorisSample{goroutines: max(s.goroutines, o.goroutines), rss: max(s.rss, o.rss),
		heapInuse: max(s.heapInuse, o.heapInuse), inFlight: max(s.inFlight, o.inFlight)}
}

// lorisSampleServer reads go_goroutines, go_memstats_heap_inuse_bytes and
// cairn_kms_data_in_flight from the ops listener and VmRSS from
// /proc/<pid>/status.
func lorisSampleServer(ops string, pid int) (lorisSample, error) {
	hc := http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get("http://" + ops + "/metrics")
	if err != nil {
		return lorisSample{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return lorisSample{}, fmt.Errorf("GET http://%s/metrics = %s", ops, resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return lorisSample{}, fmt.Errorf("http://%s/metrics: %w", ops, err)
	}
	gauge := func(name string) (float64, error) {
		f, ok := fams[name]
		if !ok || len(f.GetMetric()) != 1 || f.GetType() != dto.MetricType_GAUGE {
			return 0, fmt.Errorf("http://%s/metrics: no single gauge %s", ops, name)
		}
		return f.GetMetric()[0].GetGauge().GetValue(), nil
	}
	var s lorisSample
	g, err := gauge("go_goroutines")
	if err != nil {
		return s, err
	}
	h, err := gauge("go_memstats_heap_inuse_bytes")
	if err != nil {
		return s, err
	}
	if s.inFlight, err = gauge("cairn_kms_data_in_flight"); err != nil {
		return s, err
	}
	u, err := framework.ProcUsage(pid)
	if err != nil {
		return s, err
	}
	s.goroutines, s.heapInuse, s.rss = int(g), int64(h), u.RSS
	return s, nil
}

// lorisWaitSettled samples the server until its goroutines are at most want, or
// fails after timeout.
func lorisWaitSettled(ops string, pid, want int, timeout time.Duration) (lorisSample, error) {
	deadline := time.Now().Add(timeout)
	for {
		s, err := lorisSampleServer(ops, pid)
		if err != nil {
			return s, err
		}
		if s.goroutines <= want {
			return s, nil
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("%s after the attackers left, want at most %d goroutines", s, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// lorisQuantile is the q-quantile of d (nearest rank).
func lorisQuantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))].Round(10 * time.Microsecond)
}

// lorisClientHello returns the bytes of a real TLS ClientHello of src's client
// configuration (the first flight a client writes), captured over a pipe.
func lorisClientHello(src *identity.Source) ([]byte, error) {
	a, b := net.Pipe()
	defer b.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		cfg := identity.ClientTLSConfig(src, func(identity.ID) error { return nil }) // never verified: the pipe's end only reads
		cfg.ServerName = "kms"
		_ = tls.Client(a, cfg).Handshake() // fails when b closes
		a.Close()
	}()
	defer func() { b.Close(); <-done }()
	_ = b.SetReadDeadline(time.Now().Add(10 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		return nil, fmt.Errorf("capturing a ClientHello: %w", err)
	}
	if hdr[0] != 0x16 {
		return nil, fmt.Errorf("capturing a ClientHello: record type %#x, want a handshake (0x16)", hdr[0])
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(b, body); err != nil {
		return nil, fmt.Errorf("capturing a ClientHello: %w", err)
	}
	return append(hdr, body...), nil
}

// lorisTrickle writes hello to conn one byte a second and reads, until the
// connection ends (the error that ended it), the context is done, or until
// (a timeout error).
func lorisTrickle(ctx context.Context, conn net.Conn, hello []byte, until time.Time) error {
	buf := make([]byte, 512)
	for i := 0; ; i++ {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if i < len(hello) {
			if _, err := conn.Write(hello[i : i+1]); err != nil {
				return err
			}
		}
		_ = conn.SetReadDeadline(lorisEarliest(time.Now().Add(time.Second), until))
		_, err := conn.Read(buf)
		if err != nil && !lorisTimedOut(err) {
			return err
		}
		if lorisTimedOut(err) && !time.Now().Before(until) {
			return err
		}
	}
}

// lorisHandshakeThenWait finishes the mTLS handshake on raw and then sends
// nothing, reading what the server sends until the connection ends.
func lorisHandshakeThenWait(ctx context.Context, raw net.Conn, creds *identity.Credentials, until time.Time) error {
	hctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	conn, _, err := creds.ClientHandshake(hctx, "kms", raw)
	if err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	defer conn.Close()
	return lorisReadUntilEnd(ctx, conn, until)
}

// lorisReadUntilEnd reads conn until it ends, the context is done, or until.
func lorisReadUntilEnd(ctx context.Context, conn net.Conn, until time.Time) error {
	buf := make([]byte, 4096)
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		_ = conn.SetReadDeadline(lorisEarliest(time.Now().Add(time.Second), until))
		_, err := conn.Read(buf)
		if err != nil && (!lorisTimedOut(err) || !time.Now().Before(until)) {
			return err
		}
	}
}

// lorisEarliest is the earlier of a and b.
func lorisEarliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func lorisTimedOut(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// lorisCut reports whether err is how a connection the server closed ends for
// its client: EOF, or a reset.
func lorisCut(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.ErrUnexpectedEOF)
}

// lorisBodylessStream opens a Decrypt call as lorisClient on a connection of its
// own and sends no request at all, without a deadline. Closing the returned
// connection ends the call.
func lorisBodylessStream(ctx context.Context, c *row40Chain) (io.Closer, error) {
	src := c.w.Source(lorisClient)
	only, err := identity.ParseAllowlist(src.TrustDomain(), "kms/us-east/*")
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(c.kms.Addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, only.Authorize)))
	if err != nil {
		return nil, err
	}
	if _, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/cairn.kms.v1.KMS/Decrypt"); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// lorisPartialBodyStream opens a Decrypt call as the credentials' client over raw
// HTTP/2 and sends a gRPC frame header announcing a 64-byte request and only
// 8 bytes of it, without a deadline. The caller drains and closes the
// returned connection, which ends the call.
func lorisPartialBodyStream(ctx context.Context, addr string, creds *identity.Credentials) (net.Conn, error) {
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, _, err := creds.ClientHandshake(hctx, "kms", raw)
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/cairn.kms.v1.KMS/Decrypt"},
		{":authority", "kms"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	fr := http2.NewFramer(conn, conn)
	err = func() error {
		if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
			return err
		}
		if err := fr.WriteSettings(); err != nil {
			return err
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
			return err
		}
		// An uncompressed message as large as the server reads at all
		// (kms.DefaultMaxRecvMsgSize) announced; 8 bytes of it (the start
		// of a DecryptRequest's keyset field) sent. A server that set aside
		// the announced size before the bytes arrive would hold 64 MiB per
		// stream.
		frame := binary.BigEndian.AppendUint32([]byte{0}, kms.DefaultMaxRecvMsgSize)
		return fr.WriteData(1, false, append(frame, 0x0a, 6, 'l', 'e', 'd', 'g', 'e', 'r'))
	}()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("raw HTTP/2 stream: %w", err)
	}
	return conn, nil
}

// lorisFlood is a stream flooder's connection and what the server said.
type lorisFlood struct {
	conn       net.Conn
	maxStreams uint32 // the server's SETTINGS_MAX_CONCURRENT_STREAMS (0: none)
	refused    int    // streams refused with REFUSED_STREAM
}

// lorisStreamFlood opens n health checks on one new mTLS connection (raw
// HTTP/2), each with its headers and no request, and reads the server's
// frames until it has seen its SETTINGS and as many REFUSED_STREAMs as its
// advertised bound leaves over, or lorisCutGuard passes (a server that
// advertises no bound refuses nothing: an error then). The caller drains
// and closes the connection, which ends the calls the server holds.
func lorisStreamFlood(ctx context.Context, addr string, creds *identity.Credentials, n int) (*lorisFlood, error) {
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, _, err := creds.ClientHandshake(hctx, "kms", raw)
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	fl := &lorisFlood{conn: conn}
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/grpc.health.v1.Health/Check"},
		{":authority", "kms"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	fr := http2.NewFramer(conn, conn)
	// Read while writing, so that the server's answers never back up.
	read := make(chan error, 1)
	go func() {
		// The guard only ends a wait that would otherwise never end.
		_ = conn.SetReadDeadline(time.Now().Add(lorisCutGuard))
		settings := false
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				read <- err
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					settings = true
					if v, ok := f.Value(http2.SettingMaxConcurrentStreams); ok {
						fl.maxStreams = v
					}
				}
			case *http2.RSTStreamFrame:
				if f.ErrCode == http2.ErrCodeRefusedStream {
					fl.refused++
				}
			}
			if settings && fl.maxStreams > 0 && fl.refused >= n-int(fl.maxStreams) {
				read <- conn.SetReadDeadline(time.Time{})
				return
			}
		}
	}()
	err = func() error {
		if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
			return err
		}
		if err := fr.WriteSettings(); err != nil {
			return err
		}
		for i := range n {
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
				return err
			}
		}
		return nil
	}()
	if err != nil {
		conn.Close()
		<-read
		return nil, fmt.Errorf("stream flood: %w", err)
	}
	if err := <-read; err != nil {
		conn.Close()
		return nil, fmt.Errorf("stream flood (%d refused, server bound %d): %w", fl.refused, fl.maxStreams, err)
	}
	return fl, nil
}

// lorisCallCap is the per-call bound TestWithheldCallsCutAtKMSCallCap gives
// its KMS server (--max-call-duration): short, so that the test waits
// seconds rather than the default 30 s, and long enough for the chain's own
// calls to it (a bundle push, the good client's round trips).
const lorisCallCap = 3 * time.Second

// TestWithheldCallsCutAtKMSCallCap is row 40's per-call bound on a real KMS
// server process started with --max-call-duration lorisCallCap. Calls whose
// client opens them, withholds the request and sets no deadline of its own
// are held by the server until the bound and no longer: a Decrypt opened
// through grpc-go without a message; lorisN Decrypt calls over raw HTTP/2
// on one connection announcing a 64 MiB request and sending 8 bytes of it;
// and grpcserver.DefaultMaxConcurrentStreams body-less health checks on
// another connection (as many as a connection may hold).
//
// Asserted: every one of them ends with DEADLINE_EXCEEDED (the guard,
// lorisCutGuard, only ends a wait that would otherwise never end); while
// their connections stay open, the server's go_goroutines comes back to
// within lorisSettle of its baseline plus lorisGoroutinesPerAttacker per
// connection (each withheld call held a goroutine until it was cut); the
// well-behaved client sees no error before, while and after the calls are
// held. Logged: the goroutines while they were held, and when they were
// cut.
//
// The chain's secret scan (oneRegionChain.requireNoSecrets) ends it.
func TestWithheldCallsCutAtKMSCallCap(t *testing.T) {
	c := startRow40Chain(t, "--max-call-duration", lorisCallCap.String())
	pid := c.kms.PID()
	trips := func(when string, n int) {
		t.Helper()
		for i := range n {
			if err := roundTrip(c.kms, c.kms, fmt.Appendf(nil, "row 40 cap trip %d", i), nil); err != nil {
				t.Fatalf("round trip %d %s: %v", i, when, err)
			}
		}
	}
	trips("before the withheld calls", 20)
	base, err := lorisSampleServer(c.ops, pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("baseline: %s", base)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	lorisSrc := c.w.Source(lorisClient)
	kmsOnly, err := identity.ParseAllowlist(lorisSrc.TrustDomain(), "kms/us-east/*")
	if err != nil {
		t.Fatal(err)
	}
	creds := identity.ClientCredentials(lorisSrc, kmsOnly.Authorize)
	start := time.Now()

	// Through grpc-go: a stream of a unary method, never sent to, without
	// a deadline.
	cc, err := grpc.NewClient(c.kms.Addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stream, err := cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/cairn.kms.v1.KMS/Decrypt")
	if err != nil {
		t.Fatal(err)
	}
	grpcEnded := make(chan error, 1)
	go func() { grpcEnded <- stream.RecvMsg(&kmsv1.DecryptResponse{}) }()

	// Over raw HTTP/2: partial Decrypt requests on one connection, and a
	// connection's worth of body-less health checks on another.
	type rawEnd struct {
		what  string
		calls lorisCalls
		err   error
	}
	rawEnded := make(chan rawEnd, 2)
	opened := make(chan struct{}, 2)
	for _, w := range []struct {
		what, path string
		n          int
		partial    bool
	}{
		{"partial Decrypt requests", "/cairn.kms.v1.KMS/Decrypt", lorisN, true},
		{"body-less health checks", "/grpc.health.v1.Health/Check", grpcserver.DefaultMaxConcurrentStreams, false},
	} {
		go func() {
			calls, err := lorisWithheldCalls(ctx, c.kms.Addr, creds, w.path, w.n, w.partial, opened)
			rawEnded <- rawEnd{what: w.what, calls: calls, err: err}
		}()
	}
	for range 2 {
		select {
		case <-opened:
		case e := <-rawEnded:
			t.Fatalf("%s: %v", e.what, e.err) // it ended before its calls were open
		}
	}
	held, err := lorisSampleServer(c.ops, pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s after the %d withheld calls were sent: %s", time.Since(start).Round(time.Millisecond), 1+lorisN+grpcserver.DefaultMaxConcurrentStreams, held)
	trips("while the withheld calls were open", 20)

	select {
	case err := <-grpcEnded:
		if status.Code(err) != codes.DeadlineExceeded {
			t.Errorf("grpc-go Decrypt that never sent its request, without a deadline: %v, want DEADLINE_EXCEEDED", err)
		}
		t.Logf("grpc-go Decrypt without a request cut after %s: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(lorisCutGuard):
		t.Fatalf("grpc-go Decrypt that never sent its request still open after %v", lorisCutGuard)
	}
	var conns []net.Conn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	for range 2 {
		e := <-rawEnded // each ends by lorisCutGuard
		if e.err != nil {
			t.Fatalf("%s: %v", e.what, e.err)
		}
		conns = append(conns, e.calls.conn)
		byStatus := map[string]int{}
		for _, st := range e.calls.status {
			byStatus[st]++
		}
		if byStatus["4"] != len(e.calls.status) {
			t.Errorf("%d %s: grpc-status %v, want all 4 (DEADLINE_EXCEEDED)", len(e.calls.status), e.what, byStatus)
		}
		t.Logf("%d %s (one connection) all ended after %s: grpc-status %v", len(e.calls.status), e.what, time.Since(start).Round(time.Millisecond), byStatus)
	}

	// The attackers' connections are still open: what the server let go
	// of is the calls.
	want := base.goroutines + 3*lorisGoroutinesPerAttacker + lorisSettle
	after, err := lorisWaitSettled(c.ops, pid, want, time.Minute)
	if err != nil {
		t.Errorf("withheld calls cut, their connections open: %v", err)
	}
	t.Logf("after the cut, connections still open: %s", after)
	trips("after the withheld calls were cut", 20)
	c.requireNoSecrets(t, nil)
}

// lorisCalls is a raw HTTP/2 connection and how each of its calls ended.
type lorisCalls struct {
	conn   net.Conn
	status map[uint32]string // grpc-status of each stream's trailers
}

// lorisWithheldCalls opens n calls of path on one new mTLS connection (raw
// HTTP/2), without a deadline: with partial, each sends a gRPC frame header
// announcing kms.DefaultMaxRecvMsgSize bytes and 8 of them; without, only
// its headers. It then reads the server's frames (answering its pings)
// until every call has its trailers, and returns their grpc-status; a reset
// before the trailers, or lorisCutGuard passing, is an error. It sends on
// opened once every call is open. The caller closes the returned
// connection.
func lorisWithheldCalls(ctx context.Context, addr string, creds *identity.Credentials, path string, n int, partial bool, opened chan<- struct{}) (lorisCalls, error) {
	raw, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return lorisCalls{}, err
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, _, err := creds.ClientHandshake(hctx, "kms", raw)
	if err != nil {
		raw.Close()
		return lorisCalls{}, fmt.Errorf("TLS handshake: %w", err)
	}
	calls := lorisCalls{conn: conn, status: map[uint32]string{}}
	var hdr bytes.Buffer
	enc := hpack.NewEncoder(&hdr)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", path},
		{":authority", "kms"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	// Read while writing, so that the server's frames never back up; the
	// reader alone writes once the calls are open (ping answers).
	var wmu sync.Mutex
	read := make(chan error, 1)
	go func() {
		// The guard only ends a wait that would otherwise never end.
		_ = conn.SetReadDeadline(time.Now().Add(lorisCutGuard))
		for len(calls.status) < n {
			f, err := fr.ReadFrame()
			if err != nil {
				read <- fmt.Errorf("%d of %d calls ended, then: %w", len(calls.status), n, err)
				return
			}
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				for _, h := range f.RegularFields() {
					if h.Name == "grpc-status" {
						calls.status[f.StreamID] = h.Value
					}
				}
			case *http2.RSTStreamFrame:
				// After its trailers the server resets a stream whose
				// client has not finished sending (NO_ERROR).
				if _, ok := calls.status[f.StreamID]; !ok {
					read <- fmt.Errorf("stream %d reset (%v) before its trailers", f.StreamID, f.ErrCode)
					return
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					wmu.Lock()
					err := fr.WritePing(true, f.Data)
					wmu.Unlock()
					if err != nil {
						read <- err
						return
					}
				}
			}
		}
		read <- conn.SetReadDeadline(time.Time{})
	}()
	err = func() error {
		wmu.Lock()
		defer wmu.Unlock()
		if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
			return err
		}
		if err := fr.WriteSettings(); err != nil {
			return err
		}
		for i := range n {
			id := uint32(2*i + 1)
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hdr.Bytes(), EndHeaders: true}); err != nil {
				return err
			}
			if partial {
				frame := binary.BigEndian.AppendUint32([]byte{0}, kms.DefaultMaxRecvMsgSize)
				if err := fr.WriteData(id, false, append(frame, 0x0a, 6, 'l', 'e', 'd', 'g', 'e', 'r')); err != nil {
					return err
				}
			}
		}
		return nil
	}()
	if err != nil {
		conn.Close()
		<-read
		return lorisCalls{}, fmt.Errorf("opening %d calls of %s: %w", n, path, err)
	}
	opened <- struct{}{}
	if err := <-read; err != nil {
		conn.Close()
		return lorisCalls{}, fmt.Errorf("%d calls of %s: %w", n, path, err)
	}
	return calls, nil
}
