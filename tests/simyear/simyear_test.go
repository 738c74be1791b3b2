// Package simyear simulates a year of Cairn's key lifecycle on a fake clock,
// in one process, with the real components: a root KMS replica and its
// distributor (rootkmstest/live), two regions of two KMS servers each over
// mTLS on 127.0.0.1, and regionctl driven through cli.RunWith. One clock,
// advanced by the test an hour at a time, is the Now of the root KMS, of
// every KMS server (and its audit log) and of regionctl.
//
// Every simulated hour a client encrypts a fresh DEK on every serving KMS
// server and keeps every ciphertext, and `regionctl rotate --due --no-push
// eu-west` runs; eu-west lags: the bundle rotate would have pushed to it is
// built at once and pushed 24 simulated hours later. Mid-span a us-east
// server restarts with an empty state directory. Every simulated day (and at
// the end) every ciphertext still within its TTL is decrypted on every
// serving server of both regions: none may fail.
//
// go test ./tests/simyear/ runs the short plan: 42 days of a keyset rotated
// every 7 days with a 21-day TTL, which shows the same steps as the year
// (5 rotations, retirements and destructions, the wipe just before a
// retirement) in a time CI affords with -race. The year itself (30-day
// rotation, 90-day TTL, 365 days) runs with -simyear.full or SIMYEAR_FULL=1:
// make simyear.
package simyear

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/bundle"
	"github.com/cairnkms/cairn/internal/devca"
	"github.com/cairnkms/cairn/internal/identity/identitytest"
	"github.com/cairnkms/cairn/kms"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
	"github.com/cairnkms/cairn/regionctl/cli"
	"github.com/cairnkms/cairn/rootkms"
	"github.com/cairnkms/cairn/rootkms/rootkmsclient"
	"github.com/cairnkms/cairn/rootkms/rootkmstest/live"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var (
	fullYear = flag.Bool("simyear.full", os.Getenv("SIMYEAR_FULL") == "1", "simulate a whole year (also SIMYEAR_FULL=1)")
	spanDays = flag.Int("simyear.days", 0, "simulate this many days of the chosen plan (0: the plan's span)")
)

const (
	keysetName = "sim/ledger"
	lead, lag  = "us-east", "eu-west"

	window       = 30 * time.Minute
	lagBy        = 24 * time.Hour
	destroyDelay = 24 * time.Hour // rotate --due's default
)

// plan is what a run simulates.
type plan struct {
	name          string
	days          int
	rotation, ttl time.Duration
	// wipeAt is when us-east kms-2 restarts with an empty state directory.
	wipeAt time.Duration
	// wantRotations is the least number of versions added.
	wantRotations int
}

var (
	// year is the done-when plan: 30-day rotation, 90-day TTL, 365 days;
	// the wipe comes mid-year, three hours before the third version's
	// retirement is due (day 182.12), which must not wait for long.
	year = plan{name: "year", days: 365, rotation: 30 * 24 * time.Hour, ttl: 90 * 24 * time.Hour,
		wipeAt: 182 * 24 * time.Hour, wantRotations: 12}
	// short is the same story scaled for CI: rotations at days 7, 14, 21,
	// 28, 35; the first version superseded at day ~8 retires at day ~30.1
	// and is destroyed a day later; the wipe comes just before, at day 30.
	short = plan{name: "short", days: 42, rotation: 7 * 24 * time.Hour, ttl: 21 * 24 * time.Hour,
		wipeAt: 30 * 24 * time.Hour, wantRotations: 5}
)

var regions = []string{lag, lead} // sorted

// t0 is the simulation's start: a Monday, on the hour.
var t0 = time.Date(2027, 1, 4, 0, 0, 0, 0, time.UTC)

// clock is the one fake clock of the whole simulation.
type clock struct{ ns atomic.Int64 }

func (c *clock) Now() time.Time       { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Set(t time.Time)      { c.ns.Store(t.UnixNano()) }
func (c *clock) Since() time.Duration { return c.Now().Sub(t0) }

// server is one KMS server of the simulation and the client's connection to
// it.
type server struct {
	region, name, id, addr, dir string
	srv                         *kms.Server
	rk                          *kms.RootKMSRegionKeys
	alog                        *audit.Log
	conn                        *grpc.ClientConn
	client                      kmsv1.KMSClient
}

// ciphertext is one the client made and keeps.
type ciphertext struct {
	ct, pt, ad []byte
	region     string
	at         time.Time
	keyID      uint32
}

// queued is an eu-west bundle waiting for its push.
type queued struct {
	path  string
	due   time.Time
	built time.Time
}

type world struct {
	t        *testing.T
	plan     plan
	clk      *clock
	pki      *identitytest.PKI
	dir      string
	config   string
	rootAddr string
	root     *rootkmsclient.Client
	signPub  ed25519.PublicKey
	servers  map[string][]*server

	cts       []ciphertext
	queue     []queued
	lagSerial uint64

	stats stats
}

type stats struct {
	rotateRuns, rotateFailures                    int
	adds, promotes, disables, schedules, destroys int
	notYet, notRecorded, heldBack                 int
	lagBuilt, lagPushed, lagPushFailures          int
	encrypts, encryptUnavailable                  int
	checks, decrypts, decryptFailures, skipped    int
	firstFailures                                 []string
	rotateErrors                                  []string
	events                                        []string
	wipedAt, healedAt                             time.Time
	rotateWall, checkWall, encryptWall, pushWall  time.Duration
}

func TestSimulatedYear(t *testing.T) {
	p := short
	if *fullYear {
		p = year
	}
	if *spanDays > 0 {
		p.wantRotations = p.wantRotations * *spanDays / p.days
		p.days = *spanDays
	}
	days := p.days
	start := time.Now()
	w := newWorld(t, p)
	wipeAt := p.wipeAt
	hours := days * 24
	for h := 1; h <= hours; h++ {
		now := t0.Add(time.Duration(h) * time.Hour)
		w.clk.Set(now)
		w.encryptAll()
		w.rotate()
		w.pushLagging()
		if now.Sub(t0) == wipeAt { // the clock may have moved on with the rollouts' bakes
			w.wipe(w.servers[lead][1])
		}
		if !w.stats.wipedAt.IsZero() && w.stats.healedAt.IsZero() && w.servers[lead][1].srv.Ready() {
			w.stats.healedAt = now
			w.event("us-east kms-2 serves again (%s after the wipe)", now.Sub(w.stats.wipedAt))
		}
		if h%24 == 0 {
			w.checkAll()
		}
		if t.Failed() && len(w.stats.firstFailures) > 0 {
			break
		}
	}
	wall := time.Since(start)
	w.report(days, wall)
	w.verify(days)
}

func newWorld(t *testing.T, p plan) *world {
	t.Helper()
	w := &world{t: t, plan: p, clk: &clock{}, dir: t.TempDir(), servers: map[string][]*server{}}
	w.clk.Set(t0)
	w.pki = identitytest.New(t, identitytest.TrustDomain)
	chain := live.Start(t, w.pki, func(c *rootkms.Config) {
		c.Now = w.clk.Now
		// Observations are recorded every hour; one missed run is tolerated.
		c.Safety = rootkms.SafetyConfig{Window: window, ObservationMaxAge: 2 * time.Hour}
	})
	w.rootAddr = chain.Addr
	w.root = rootkmsclient.New(w.pki.Source("spiffe://cairn.test/regionctl/global/observer"), []string{w.rootAddr})
	t.Cleanup(w.root.Close)

	keys := filepath.Join(w.dir, "keys")
	w.mustRegionctl(false, "keys", "generate", "--out", keys)
	pub, err := bundle.ReadPublicKey(filepath.Join(keys, cli.SigningPubFile))
	if err != nil {
		t.Fatal(err)
	}
	w.signPub = pub
	teams := filepath.Join(w.dir, "teams")
	writeFile(t, filepath.Join(teams, "sim.json"), fmt.Sprintf(`{"team":"sim","keysets":[
  {"name":%q,"regions":["us-east","eu-west"],"purpose":"envelope","template":"AES256_GCM",
   "rotation_period":%q,"ciphertext_ttl":%q,
   "acl":{"encrypt":["client/*/app"],"decrypt":["client/*/app"],"generate_data_key":[],"rewrap":[]}}]}`,
		keysetName, p.rotation.String(), p.ttl.String()))

	for _, region := range regions {
		for i := range 2 {
			w.servers[region] = append(w.servers[region], w.startServer(region, fmt.Sprintf("kms-%d", i+1), "", ""))
		}
	}
	t.Cleanup(func() {
		for _, region := range regions {
			for _, s := range w.servers[region] {
				s.stop()
			}
		}
	})
	_, cert, key := w.pki.Issue("spiffe://cairn.test/regionctl/global/regionctl", devca.LeafOptions{})
	cfg := fmt.Sprintf(`{"trust_domain":"cairn.test","identity":{"cert":%q,"key":%q,"ca":%q},
 "rootkms":[%q],"regions":{"us-east":[%q,%q],"eu-west":[%q,%q]},
 "signing_key":"keys/bundle-signing.key","signing_pubs":["keys/bundle-signing.pub"],"teams":"teams","propagation_window":%q}`,
		cert, key, w.pki.BundleFile(), w.rootAddr,
		w.servers[lead][0].addr, w.servers[lead][1].addr, w.servers[lag][0].addr, w.servers[lag][1].addr, window.String())
	w.config = filepath.Join(w.dir, "regionctl.json")
	writeFile(t, w.config, cfg)

	for _, region := range regions {
		w.mustRegionctl(true, "region", "create", "--region", region)
	}
	w.mustRegionctl(true, "keyset", "create", "--teams", teams)
	for _, region := range regions {
		out := filepath.Join(w.dir, "bundles", region+"-1.bundle")
		w.mustRegionctl(true, "bundle", "build", "--region", region, "--serial", "1", "--out", out)
		w.mustRegionctl(true, "bundle", "push", "--bundle", out)
	}
	w.lagSerial = 1
	return w
}

// startServer starts a KMS server of region; addr "" picks a port, dir ""
// a new state directory.
func (w *world) startServer(region, name, addr, dir string) *server {
	t := w.t
	t.Helper()
	s := &server{region: region, name: name, id: fmt.Sprintf("spiffe://cairn.test/kms/%s/%s", region, name), addr: addr, dir: dir}
	if s.dir == "" {
		s.dir = filepath.Join(w.dir, "state", region, name)
	}
	if s.addr == "" {
		s.addr = "127.0.0.1:0"
	}
	lis, err := net.Listen("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	s.addr = lis.Addr().String()
	s.alog, err = audit.Open(filepath.Join(w.dir, "audit", region, name, fmt.Sprintf("audit-%d.log", time.Now().UnixNano())), audit.Options{Now: w.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	src := w.pki.Source(s.id)
	s.rk = kms.NewRootKMSRegionKeys(src, []string{w.rootAddr})
	s.srv, err = kms.New(kms.Config{
		Region: region, StateDir: s.dir, Source: src, RegionKeys: s.rk,
		SigningKeys: []ed25519.PublicKey{w.signPub}, Audit: s.alog, Now: w.clk.Now,
		Logger:   slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError})),
		RetryMin: 10 * time.Millisecond, RetryMax: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.srv.Start(lis); err != nil {
		t.Fatal(err)
	}
	s.conn, err = grpc.NewClient(s.addr, grpc.WithTransportCredentials(w.pki.ClientCredentials(fmt.Sprintf("spiffe://cairn.test/client/%s/app", region))))
	if err != nil {
		t.Fatal(err)
	}
	s.client = kmsv1.NewKMSClient(s.conn)
	return s
}

func (s *server) stop() {
	if s.srv == nil {
		return
	}
	s.conn.Close()
	s.srv.Close()
	s.rk.Close()
	s.alog.Close()
	s.srv = nil
}

// wipe stops s, deletes its state directory and starts it again, empty, on
// the same address.
func (w *world) wipe(s *server) {
	w.t.Helper()
	s.stop()
	if err := os.RemoveAll(s.dir); err != nil {
		w.t.Fatal(err)
	}
	fresh := w.startServer(s.region, s.name, s.addr, s.dir)
	*s = *fresh
	w.stats.wipedAt = w.clk.Now()
	w.event("us-east kms-2 restarted with an empty state directory")
}

func (w *world) event(format string, a ...any) {
	w.stats.events = append(w.stats.events, fmt.Sprintf("day %6.2f  %s", w.clk.Since().Hours()/24, fmt.Sprintf(format, a...)))
}

// regionctl runs regionctl on the simulation's clock, with the config file
// if withConfig.
func (w *world) regionctl(withConfig bool, args ...string) (int, string, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if withConfig {
		args = append(args, "--config", w.config)
	}
	var out, errb bytes.Buffer
	// rotate --due rolls its bundles out in stages, each baked on the
	// simulation's clock (a second: see rotate).
	code := cli.RunWith(ctx, args, &out, &errb, cli.RunOptions{Now: w.clk.Now,
		Sleep: func(_ context.Context, d time.Duration) error { w.clk.Set(w.clk.Now().Add(d)); return nil }})
	return code, out.String(), errb.String()
}

func (w *world) mustRegionctl(withConfig bool, args ...string) string {
	w.t.Helper()
	code, out, errs := w.regionctl(withConfig, args...)
	if code != 0 {
		w.t.Fatalf("day %.2f: regionctl %s = %d, want 0\nstdout:\n%s\nstderr:\n%s", w.clk.Since().Hours()/24, strings.Join(args, " "), code, out, errs)
	}
	return out
}

// encryptAll encrypts one fresh DEK on every serving server.
func (w *world) encryptAll() {
	start := time.Now()
	defer func() { w.stats.encryptWall += time.Since(start) }()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, region := range regions {
		for _, s := range w.servers[region] {
			pt := make([]byte, 32)
			_, _ = rand.Read(pt)
			ad := fmt.Appendf(nil, "%s/%s/%d", region, s.name, w.clk.Now().Unix())
			resp, err := s.client.Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: keysetName, Plaintext: pt, AssociatedData: ad})
			switch {
			case status.Code(err) == codes.Unavailable && !s.srv.Ready():
				w.stats.encryptUnavailable++ // a client fails over to the other server
				continue
			case err != nil:
				w.t.Errorf("day %.2f: Encrypt on %s/%s = %v", w.clk.Since().Hours()/24, region, s.name, err)
				continue
			}
			w.stats.encrypts++
			w.cts = append(w.cts, ciphertext{ct: resp.GetCiphertext(), pt: pt, ad: ad, region: region, at: w.clk.Now(), keyID: resp.GetKeyId()})
		}
	}
}

// rotate runs rotate --due, holding eu-west back; the eu-west bundle it
// would have pushed is built now and queued for lagBy.
func (w *world) rotate() {
	start := time.Now()
	defer func() { w.stats.rotateWall += time.Since(start) }()
	w.stats.rotateRuns++
	code, out, errs := w.regionctl(true, "rotate", "--due", "--no-push", lag, "--out-dir", filepath.Join(w.dir, "rotate"), "--bake", "1s")
	if code != 0 {
		w.stats.rotateFailures++
		if len(w.stats.rotateErrors) < 5 {
			w.stats.rotateErrors = append(w.stats.rotateErrors, fmt.Sprintf("day %.2f: exit %d\nstdout:\n%s\nstderr:\n%s", w.clk.Since().Hours()/24, code, out, errs))
		}
	}
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "done: "):
			w.event("%s", line)
			switch {
			case strings.Contains(line, "add"):
				w.stats.adds++
			case strings.Contains(line, "promote"):
				w.stats.promotes++
			case strings.Contains(line, "disable"):
				w.stats.disables++
			case strings.Contains(line, "schedule"):
				w.stats.schedules++
			case strings.Contains(line, "destroy"):
				w.stats.destroys++
			}
		case strings.HasPrefix(line, "not yet: "):
			w.stats.notYet++
		case strings.HasPrefix(line, "not recorded: "):
			w.stats.notRecorded++
		case strings.HasPrefix(line, "not rolled out: region "+lag):
			w.stats.heldBack++
			w.lagSerial++
			path := filepath.Join(w.dir, "bundles", fmt.Sprintf("%s-%d.bundle", lag, w.lagSerial))
			w.mustRegionctl(true, "bundle", "build", "--region", lag, "--serial", fmt.Sprint(w.lagSerial), "--out", path)
			w.stats.lagBuilt++
			w.queue = append(w.queue, queued{path: path, due: w.clk.Now().Add(lagBy), built: w.clk.Now()})
		}
	}
}

// pushLagging pushes every queued eu-west bundle that is due, in order.
func (w *world) pushLagging() {
	start := time.Now()
	defer func() { w.stats.pushWall += time.Since(start) }()
	for len(w.queue) > 0 && !w.queue[0].due.After(w.clk.Now()) {
		q := w.queue[0]
		w.queue = w.queue[1:]
		code, out, errs := w.regionctl(true, "bundle", "push", "--bundle", q.path)
		if code != 0 {
			w.stats.lagPushFailures++
			w.t.Errorf("day %.2f: pushing the eu-west bundle built at day %.2f = %d\nstdout:\n%s\nstderr:\n%s",
				w.clk.Since().Hours()/24, q.built.Sub(t0).Hours()/24, code, out, errs)
			continue
		}
		w.stats.lagPushed++
		w.event("eu-west pushed %s (built %s earlier)", filepath.Base(q.path), w.clk.Now().Sub(q.built))
	}
}

// checkAll decrypts every ciphertext within its TTL on every serving server
// of every region.
func (w *world) checkAll() {
	start := time.Now()
	defer func() { w.stats.checkWall += time.Since(start) }()
	w.stats.checks++
	now := w.clk.Now()
	var live []int
	for i, c := range w.cts {
		if c.at.Add(w.plan.ttl).After(now) {
			live = append(live, i)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, region := range regions {
		for _, s := range w.servers[region] {
			if !s.srv.Ready() {
				w.stats.skipped += len(live)
				continue
			}
			for chunk := range slices.Chunk(live, 1000) {
				req := &kmsv1.DecryptBatchRequest{Keyset: keysetName}
				for _, i := range chunk {
					req.Items = append(req.Items, &kmsv1.DecryptItem{Ciphertext: w.cts[i].ct, AssociatedData: w.cts[i].ad})
				}
				resp, err := s.client.DecryptBatch(ctx, req)
				if err != nil {
					w.fail("DecryptBatch on %s/%s = %v", region, s.name, err)
					w.stats.decryptFailures += len(chunk)
					continue
				}
				for j, r := range resp.GetResults() {
					c := w.cts[chunk[j]]
					w.stats.decrypts++
					if e := r.GetError(); e != nil {
						w.stats.decryptFailures++
						w.fail("%s/%s: ciphertext made in %s at day %.2f with key %d (TTL until day %.2f) does not decrypt: %s",
							region, s.name, c.region, c.at.Sub(t0).Hours()/24, c.keyID, c.at.Add(w.plan.ttl).Sub(t0).Hours()/24, e.GetMessage())
						continue
					}
					if !bytes.Equal(r.GetOk().GetPlaintext(), c.pt) {
						w.stats.decryptFailures++
						w.fail("%s/%s: ciphertext made at day %.2f decrypts to other bytes", region, s.name, c.at.Sub(t0).Hours()/24)
					}
				}
			}
		}
	}
}

func (w *world) fail(format string, a ...any) {
	msg := fmt.Sprintf("day %.2f: ", w.clk.Since().Hours()/24) + fmt.Sprintf(format, a...)
	if len(w.stats.firstFailures) < 10 {
		w.stats.firstFailures = append(w.stats.firstFailures, msg)
		w.t.Error(msg)
	}
}

// record reads the keyset's record from the root KMS.
func (w *world) record() *statev1.KeysetRecord {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var k *rootkmsv1.Keyset
	err := w.root.Do(ctx, func(ctx context.Context, c rootkmsv1.RootKMSClient) (err error) {
		k, err = c.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: keysetName})
		return err
	})
	if err != nil {
		w.t.Fatalf("GetKeyset(%s) = %v", keysetName, err)
	}
	return k.GetRecord()
}

func day(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%.2f", t.Sub(t0).Hours()/24)
}

func (w *world) report(days int, wall time.Duration) {
	t := w.t
	s := w.stats
	t.Logf("plan %s: rotation period %v, TTL %v, window %v, eu-west %v behind; simulated %d days (%d hours) in %v wall time",
		w.plan.name, w.plan.rotation, w.plan.ttl, window, lagBy, days, days*24, wall.Round(time.Millisecond))
	t.Logf("wall: rotate --due %v (%.1f ms/run), encrypt %v, daily checks %v, eu-west pushes %v",
		s.rotateWall.Round(time.Millisecond), float64(s.rotateWall.Microseconds())/1000/float64(max(s.rotateRuns, 1)),
		s.encryptWall.Round(time.Millisecond), s.checkWall.Round(time.Millisecond), s.pushWall.Round(time.Millisecond))
	t.Logf("rotate --due: %d runs, %d failed; steps done: %d add, %d promote, %d disable, %d schedule destroy, %d destroy; %d not-yet lines, %d regions not recorded",
		s.rotateRuns, s.rotateFailures, s.adds, s.promotes, s.disables, s.schedules, s.destroys, s.notYet, s.notRecorded)
	t.Logf("eu-west lag: %d bundles held back and built, %d pushed a day later, %d push failures, %d still queued", s.lagBuilt, s.lagPushed, s.lagPushFailures, len(w.queue))
	t.Logf("client: %d ciphertexts made (%d encrypts refused by the wiped server while it served nothing), %d daily checks, %d decrypts, %d failures, %d skipped (server not serving)",
		s.encrypts, s.encryptUnavailable, s.checks, s.decrypts, s.decryptFailures, s.skipped)
	if !s.wipedAt.IsZero() {
		t.Logf("wipe: us-east kms-2 emptied at day %s, serving again at day %s", day(s.wipedAt), day(s.healedAt))
	}
	used := map[uint32]int{}
	for _, c := range w.cts {
		used[c.keyID]++
	}
	rec := w.record()
	t.Logf("record of %s (revision %d):", keysetName, rec.GetRevision())
	t.Logf("  %-10s %-17s %7s %8s %10s %11s %8s %13s %9s %10s", "KEY", "STATE", "CREATED", "PRIMARY", "SUPERSEDED", "DISABLED", "DESTROY", "DESTROYED", "ENCRYPTS", "CLIENT-CTS")
	for _, v := range rec.GetVersions() {
		t.Logf("  %-10d %-17s %7s %8s %10s %11s %8s %13s %9d %10d", v.GetKeyId(), strings.TrimPrefix(v.GetState().String(), "KEYSET_VERSION_STATE_"),
			day(ts(v.GetCreatedAt())), day(ts(v.GetPrimarySince())), day(ts(v.GetSupersededAt())), day(ts(v.GetDisabledAt())),
			day(ts(v.GetDestroyAfter())), day(ts(v.GetDestroyedAt())), v.GetEncryptCount(), used[v.GetKeyId()])
	}
	for _, e := range s.events {
		t.Log(e)
	}
	for _, e := range s.rotateErrors {
		t.Logf("rotate --due failed: %s", e)
	}
}

func ts(p *timestamppb.Timestamp) time.Time {
	if p == nil {
		return time.Time{}
	}
	return p.AsTime()
}

// verify checks the record against the rules and the client's ciphertexts.
func (w *world) verify(days int) {
	t := w.t
	rec := w.record()
	if w.stats.decryptFailures != 0 {
		t.Errorf("%d in-TTL decrypt failures, want 0", w.stats.decryptFailures)
	}
	// Rotations: one every rotation period from the start.
	ttl := w.plan.ttl
	if got := len(rec.GetVersions()) - 1; got < w.plan.wantRotations {
		t.Errorf("%d rotations (versions added) in %d days with a %v rotation period, want ≥ %d", got, days, w.plan.rotation, w.plan.wantRotations)
	}
	lastEncrypt := map[uint32]time.Time{}
	for _, c := range w.cts {
		if c.at.After(lastEncrypt[c.keyID]) {
			lastEncrypt[c.keyID] = c.at
		}
	}
	if w.stats.rotateFailures > 0 {
		t.Errorf("rotate --due failed %d times of %d runs, want 0 (first failures logged above)", w.stats.rotateFailures, w.stats.rotateRuns)
	}
	end := w.clk.Now()
	// On schedule: a superseded version leaves the decrypt set once the
	// lagging region stopped encrypting with it (lagBy after it was
	// superseded) + TTL + window, at the next hourly run (+ an hour of
	// slack); a scheduled destruction happens at the first run after
	// destroy_after (+ an hour of slack).
	const slack = 2 * time.Hour
	counts := map[statev1.KeysetVersionState]int{}
	retired := 0
	for _, v := range rec.GetVersions() {
		counts[v.GetState()]++
		id := v.GetKeyId()
		disabled := ts(v.GetDisabledAt())
		if superseded := ts(v.GetSupersededAt()); !superseded.IsZero() {
			due := superseded.Add(lagBy + ttl + window + slack)
			switch {
			case disabled.IsZero() && due.Before(end):
				t.Errorf("key %d superseded at day %s is not retired at the end (day %s), want it retired by day %s", id, day(superseded), day(end), day(due))
			case !disabled.IsZero() && disabled.After(due):
				t.Errorf("key %d superseded at day %s was retired at day %s, want by day %s", id, day(superseded), day(disabled), day(due))
			}
		}
		if after := ts(v.GetDestroyAfter()); !after.IsZero() {
			destroyed := ts(v.GetDestroyedAt())
			switch {
			case destroyed.IsZero() && after.Add(slack).Before(end):
				t.Errorf("key %d (destroy after day %s) is not destroyed at the end (day %s)", id, day(after), day(end))
			case !destroyed.IsZero() && destroyed.After(after.Add(slack)):
				t.Errorf("key %d destroyed at day %s, want by day %s (destroy after + %v)", id, day(destroyed), day(after.Add(slack)), slack)
			}
		}
		if disabled.IsZero() {
			continue
		}
		retired++
		superseded := ts(v.GetSupersededAt())
		if superseded.IsZero() {
			t.Errorf("key %d was disabled at day %s but never superseded", id, day(disabled))
		} else if earliest := superseded.Add(ttl + window); disabled.Before(earliest) {
			t.Errorf("key %d disabled at day %s, before superseded_at + TTL + window = day %s", id, day(disabled), day(earliest))
		}
		if last := lastEncrypt[id]; !last.IsZero() && disabled.Before(last.Add(ttl)) {
			t.Errorf("key %d disabled at day %s, while a ciphertext made at day %s is within its TTL", id, day(disabled), day(last))
		}
		if destroyed := ts(v.GetDestroyedAt()); !destroyed.IsZero() && destroyed.Before(ts(v.GetDestroyAfter())) {
			t.Errorf("key %d destroyed at day %s, before destroy_after day %s", id, day(destroyed), day(ts(v.GetDestroyAfter())))
		}
	}
	if retired == 0 && days > 30 {
		t.Errorf("no version retired in %d days, want the first one retired about TTL + a day after it was superseded", days)
	}
	if counts[statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY] != 1 {
		t.Errorf("record has %d primary versions, want 1", counts[statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY])
	}
	var parts []string
	for _, st := range slices.Sorted(maps.Keys(counts)) {
		parts = append(parts, fmt.Sprintf("%s %d", strings.ToLower(strings.TrimPrefix(st.String(), "KEYSET_VERSION_STATE_")), counts[st]))
	}
	t.Logf("record state counts: %s; versions used by the client: %d", strings.Join(parts, ", "), len(lastEncrypt))
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}
