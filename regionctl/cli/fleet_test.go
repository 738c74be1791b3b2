package cli_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

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

// The fleet tests run regionctl (cli.RunWith) against a real in-process
// root KMS (rootkmstest/live) and real regional KMS servers (kms.New, with
// their region keys from that root KMS), all on one fake clock: the root
// KMS's Config.Now, the KMS servers' Config.Now and regionctl's
// RunOptions.Now. Windows, TTLs and rotation periods pass by advancing it.

const (
	fleetKeyset = "payments/ledger"
	fleetWindow = 10 * time.Minute
)

// fakeClock is a clock tests advance by hand. Safe for concurrent use.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fleetEnv is a root KMS, KMS servers by region, and regionctl's config
// file naming them.
type fleetEnv struct {
	t      *testing.T
	pki    *identitytest.PKI
	clk    *fakeClock
	chain  *live.Chain
	dir    string
	config string
	teams  string
	pub    ed25519.PublicKey
	kms    map[string][]*fleetKMS
	files  map[string]any
	// onBake, if set, is called at each rollout bake (before the fake
	// clock advances by it); an error ends the bake, and so the rollout's
	// run, with it.
	onBake func(time.Duration) error
}

// fleetKMS is one in-process KMS server.
type fleetKMS struct {
	region, name, addr string
	srv                *kms.Server
	stop               func()
}

// Stop stops the server (once); its address then refuses connections.
func (k *fleetKMS) Stop() { k.stop() }

// ledgerTeam is the team file: payments/ledger in regions, rotation period
// rotation, TTL ttl, encrypt and decrypt for each region's clients.
func ledgerTeam(regions []string, rotation, ttl time.Duration) string {
	var acl []string
	for _, r := range regions {
		acl = append(acl, "client/"+r+"/*")
	}
	b, _ := json.Marshal(map[string]any{"team": "payments", "keysets": []any{map[string]any{
		"name": fleetKeyset, "regions": regions, "purpose": "envelope", "rotation_period": rotation.String(),
		"ciphertext_ttl": ttl.String(), "acl": map[string]any{"encrypt": acl, "decrypt": acl}}}})
	return string(b)
}

// newFleetEnv starts the root KMS (window fleetWindow) and servers[region]
// KMS servers per region, creates the regions and payments/ledger (in every
// region, rotation period 1h, TTL 2h) and writes regionctl's config file.
// Nothing is pushed.
func newFleetEnv(t *testing.T, servers map[string]int, opts ...func(*rootkms.Config)) *fleetEnv {
	t.Helper()
	e := &fleetEnv{t: t, pki: identitytest.New(t, identitytest.TrustDomain), clk: &fakeClock{now: time.Now().UTC().Truncate(time.Second)},
		dir: t.TempDir(), kms: map[string][]*fleetKMS{}}
	e.chain = live.Start(t, e.pki, append([]func(*rootkms.Config){func(c *rootkms.Config) {
		c.Now = e.clk.Now
		c.Safety.Window = fleetWindow
	}}, opts...)...)
	keys := filepath.Join(e.dir, "keys")
	e.teams = filepath.Join(e.dir, "teams")
	e.config = filepath.Join(e.dir, "regionctl.json")
	_, cert, key := e.pki.Issue(regionctlID, devca.LeafOptions{})
	var regions []string
	for r := range servers {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	writeFile(t, filepath.Join(e.teams, "payments.json"), ledgerTeam(regions, time.Hour, 2*time.Hour))
	e.files = map[string]any{
		"trust_domain":       identitytest.TrustDomain,
		"identity":           map[string]string{"cert": cert, "key": key, "ca": e.pki.BundleFile()},
		"rootkms":            []string{e.chain.Addr},
		"signing_key":        filepath.Join(keys, "bundle-signing.key"),
		"signing_pubs":       []string{filepath.Join(keys, "bundle-signing.pub")},
		"teams":              e.teams,
		"propagation_window": fleetWindow.String(),
	}
	e.writeConfig()
	mustRun(t, "keys", "generate", "--out", keys)
	pub, err := bundle.ReadPublicKey(filepath.Join(keys, "bundle-signing.pub"))
	if err != nil {
		t.Fatal(err)
	}
	e.pub = pub
	addrs := map[string][]string{}
	for _, region := range regions {
		for i := range servers[region] {
			k := e.startKMS(region, fmt.Sprintf("kms-%d", i+1))
			addrs[region] = append(addrs[region], k.addr)
		}
		e.mustRC("region", "create", "--region", region)
	}
	e.files["regions"] = addrs
	e.writeConfig()
	e.mustRC("keyset", "create")
	return e
}

func (e *fleetEnv) writeConfig() {
	e.t.Helper()
	b, err := json.MarshalIndent(e.files, "", "  ")
	if err != nil {
		e.t.Fatal(err)
	}
	writeFile(e.t, e.config, string(b))
}

// startKMS starts a KMS server of region on the shared clock, fetching its
// region keys from the root KMS.
func (e *fleetEnv) startKMS(region, name string) *fleetKMS {
	t := e.t
	t.Helper()
	src := e.pki.Source(fmt.Sprintf("spiffe://%s/kms/%s/%s", identitytest.TrustDomain, region, name))
	alog, err := audit.Open(filepath.Join(t.TempDir(), "audit.log"), audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	rk := kms.NewRootKMSRegionKeys(src, []string{e.chain.Addr})
	srv, err := kms.New(kms.Config{Region: region, StateDir: t.TempDir(), Source: src, RegionKeys: rk,
		SigningKeys: []ed25519.PublicKey{e.pub}, Audit: alog, Now: e.clk.Now, FetchTimeout: 5 * time.Second,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), RetryMin: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond})
	if err != nil {
		t.Fatalf("kms.New = %v", err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(lis); err != nil {
		t.Fatalf("Start = %v", err)
	}
	var once sync.Once
	k := &fleetKMS{region: region, name: name, addr: lis.Addr().String(), srv: srv, stop: func() {
		once.Do(func() { srv.Close(); rk.Close(); alog.Close() })
	}}
	t.Cleanup(k.Stop)
	e.kms[region] = append(e.kms[region], k)
	return k
}

// rc runs regionctl with the env's config file on the shared clock.
func (e *fleetEnv) rc(args ...string) result {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := cli.RunWith(ctx, append(args, "--config", e.config), &out, &errb, cli.RunOptions{Now: e.clk.Now, Sleep: e.bake})
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

// bake is how a rollout (rotate --due's) waits out a bake: on the fake
// clock, after onBake.
func (e *fleetEnv) bake(_ context.Context, d time.Duration) error {
	if e.onBake != nil {
		if err := e.onBake(d); err != nil {
			return err
		}
	}
	e.clk.Advance(d)
	return nil
}

func (e *fleetEnv) mustRC(args ...string) result {
	e.t.Helper()
	r := e.rc(args...)
	if r.code != 0 {
		e.t.Fatalf("regionctl %s = %d, want 0\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// push builds and pushes region's next bundle and returns its serial.
func (e *fleetEnv) push(region string) uint64 {
	e.t.Helper()
	out := filepath.Join(e.dir, region+".bundle")
	r := e.mustRC("bundle", "build", "--region", region, "--out", out)
	m := regexp.MustCompile(`serial (\d+) sha256`).FindStringSubmatch(r.stdout)
	if m == nil {
		e.t.Fatalf("bundle build printed %q", r.stdout)
	}
	e.mustRC("bundle", "push", "--bundle", out)
	var serial uint64
	fmt.Sscan(m[1], &serial)
	return serial
}

// status is k's GetStatus with keysets, as regionctl.
func (e *fleetEnv) status(k *fleetKMS) *kmsv1.GetStatusResponse {
	e.t.Helper()
	cc := e.dial(regionctlID, k.addr)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := kmsv1.NewKMSAdminClient(cc).GetStatus(ctx, &kmsv1.GetStatusRequest{IncludeKeysets: true})
	if err != nil {
		e.t.Fatalf("GetStatus(%s) = %v", k.addr, err)
	}
	return st
}

// encrypt encrypts through k as the region's client and returns the key ID.
func (e *fleetEnv) encrypt(k *fleetKMS) uint32 {
	e.t.Helper()
	cc := e.dial(fmt.Sprintf("spiffe://%s/client/%s/app", identitytest.TrustDomain, k.region), k.addr)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := kmsv1.NewKMSClient(cc).Encrypt(ctx, &kmsv1.EncryptRequest{Keyset: fleetKeyset, Plaintext: []byte("dek")})
	if err != nil {
		e.t.Fatalf("Encrypt on %s = %v", k.addr, err)
	}
	return r.GetKeyId()
}

func (e *fleetEnv) dial(id, addr string) *grpc.ClientConn {
	e.t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(e.pki.ClientCredentials(id)))
	if err != nil {
		e.t.Fatal(err)
	}
	return cc
}

// record reads payments/ledger's record as regionctl.
func (e *fleetEnv) record() *statev1.KeysetRecord {
	e.t.Helper()
	c := rootkmsclient.New(e.pki.Source(regionctlID), []string{e.chain.Addr})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var k *rootkmsv1.Keyset
	if err := c.Do(ctx, func(ctx context.Context, rc rootkmsv1.RootKMSClient) (err error) {
		k, err = rc.GetKeyset(ctx, &rootkmsv1.GetKeysetRequest{Name: fleetKeyset})
		return err
	}); err != nil {
		e.t.Fatalf("GetKeyset = %v", err)
	}
	return k.GetRecord()
}

// version returns the record of key ID id.
func version(rec *statev1.KeysetRecord, id uint32) *statev1.KeysetVersionRecord {
	for _, v := range rec.GetVersions() {
		if v.GetKeyId() == id {
			return v
		}
	}
	return nil
}

func propagated(v *statev1.KeysetVersionRecord, region string) (time.Time, bool) {
	for _, p := range v.GetPropagated() {
		if p.GetRegion() == region {
			return p.GetAt().AsTime(), true
		}
	}
	return time.Time{}, false
}

func usageOf(v *statev1.KeysetVersionRecord, region string) *statev1.RegionUsage {
	for _, u := range v.GetUsage() {
		if u.GetRegion() == region {
			return u
		}
	}
	return nil
}

func TestStatus(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	e.push("us-east")
	k1, k2 := e.kms["us-east"][0], e.kms["us-east"][1]
	v1 := e.encrypt(k1)
	st := e.status(k1)

	r := e.mustRC("status")
	contains(t, "status stdout", r.stdout, "region us-east\n", "SERVER", "STATE", "SERIAL", "KEYSET", "RECORD", "NEXT STEP",
		fmt.Sprintf("%x", st.GetBundle().GetSha256())[:12])
	for _, re := range []string{
		regexp.QuoteMeta(k1.addr) + `\s+SERVING\s+1\s`, regexp.QuoteMeta(k2.addr) + `\s+SERVING\s+1\s`,
		fmt.Sprintf(`%s\s+%d\s+2/2 primary\s+1\s+0\s+\S+\s+\S+\s+primary\s+-\n`, fleetKeyset, v1),
	} {
		if !regexp.MustCompile(re).MatchString(r.stdout) {
			t.Errorf("status stdout = %q, want a line matching %s", r.stdout, re)
		}
	}

	r = e.mustRC("status", "--json")
	var report []struct {
		Region  string `json:"region"`
		Servers []struct {
			Address, ID, State, SHA256, Error string
			Serial                            uint64
		} `json:"servers"`
		Versions []struct {
			Keyset   string `json:"keyset"`
			KeyID    uint32 `json:"key_id"`
			ServedBy int    `json:"served_by"`
			Servers  int    `json:"servers"`
			Primary  int    `json:"primary_on"`
			Encrypts uint64 `json:"encrypts"`
			Record   string `json:"record_state"`
			Next     string `json:"next_step"`
			LastEnc  string `json:"last_encrypt"`
		} `json:"versions"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &report); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, r.stdout)
	}
	if len(report) != 1 || report[0].Region != "us-east" || len(report[0].Servers) != 2 || len(report[0].Versions) != 1 {
		t.Fatalf("status --json = %+v, want us-east with 2 servers and 1 version", report)
	}
	for _, s := range report[0].Servers {
		if s.State != "SERVING" || s.Serial != 1 || s.SHA256 != fmt.Sprintf("%x", st.GetBundle().GetSha256()) || s.Error != "" ||
			!strings.HasPrefix(s.ID, "spiffe://cairn.test/kms/us-east/") {
			t.Errorf("status --json server %+v, want SERVING serial 1 with the bundle's sha256 and the SPIFFE ID it proved", s)
		}
	}
	if v := report[0].Versions[0]; v.Keyset != fleetKeyset || v.KeyID != v1 || v.ServedBy != 2 || v.Servers != 2 || v.Primary != 2 ||
		v.Encrypts != 1 || v.Record != "primary" || v.Next != "-" || v.LastEnc == "" {
		t.Errorf("status --json version = %+v, want %s/%d served by 2/2, primary on 2, 1 encrypt, record primary", v, fleetKeyset, v1)
	}

	// An unreachable server: shown, and exit 1.
	k2.Stop()
	r = e.rc("status", "--timeout", "5s")
	if r.code != 1 {
		t.Fatalf("status with %s stopped = %d, want 1\n%s%s", k2.addr, r.code, r.stdout, r.stderr)
	}
	for _, re := range []string{regexp.QuoteMeta(k1.addr) + `\s+SERVING\s`, regexp.QuoteMeta(k2.addr) + `\s+UNREACHABLE\s`, fmt.Sprintf(`%d\s+1/2 primary\s`, v1)} {
		if !regexp.MustCompile(re).MatchString(r.stdout) {
			t.Errorf("status stdout (one server down) = %q, want a line matching %s", r.stdout, re)
		}
	}
	contains(t, "status stderr (one server down)", r.stderr, "region us-east: 1 server(s) unreachable")
	r = e.rc("status", "--json", "--timeout", "5s")
	if r.code != 1 || !strings.Contains(r.stdout, `"state": "UNREACHABLE"`) {
		t.Errorf("status --json with a server down = %d, %q; want 1 and an UNREACHABLE server", r.code, r.stdout)
	}
}

func TestObserveRecords(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2, "eu-west": 1})
	e.push("us-east") // eu-west is not pushed: its server serves nothing
	k1, k2 := e.kms["us-east"][0], e.kms["us-east"][1]
	v1 := e.encrypt(k1)
	encAt := e.clk.Now()
	e.clk.Advance(time.Minute)
	seen := e.clk.Now()

	r := e.rc("observe")
	if r.code != 0 {
		t.Fatalf("observe = %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "observe stdout", r.stdout, "recorded: region us-east: 1 keyset(s) as served by all 2 server(s)",
		"not recorded: region eu-west: 0 of 1 server(s) unreachable or not serving; nothing recorded for it")
	v := version(e.record(), v1)
	if at, ok := propagated(v, "us-east"); !ok || !at.Equal(seen) {
		t.Errorf("after observe, version %d propagated in us-east at %v (%t), want %v", v1, at, ok, seen)
	}
	if _, ok := propagated(v, "eu-west"); ok {
		t.Errorf("after observe, version %d propagated in eu-west, whose server serves nothing", v1)
	}
	u := usageOf(v, "us-east")
	if u == nil || u.GetEncryptCount() != 1 || !u.GetLastEncrypt().AsTime().Equal(encAt) || !u.GetObservedAt().AsTime().Equal(seen) {
		t.Errorf("us-east usage of version %d = %v, want 1 encrypt at %v observed at %v", v1, u, encAt, seen)
	}
	if usageOf(v, "eu-west") != nil {
		t.Errorf("eu-west usage recorded although its server serves nothing: %v", usageOf(v, "eu-west"))
	}

	// status --record is observe.
	e.clk.Advance(time.Minute)
	r = e.mustRC("status", "--region", "us-east", "--record")
	contains(t, "status --record stdout", r.stdout, "recorded: region us-east")
	if u := usageOf(version(e.record(), v1), "us-east"); !u.GetObservedAt().AsTime().Equal(e.clk.Now()) {
		t.Errorf("status --record: us-east observed at %v, want %v", u.GetObservedAt().AsTime(), e.clk.Now())
	}

	// A region with an unreachable server records nothing.
	before := usageOf(version(e.record(), v1), "us-east")
	e.encrypt(k1)
	k2.Stop()
	e.clk.Advance(time.Minute)
	r = e.rc("observe", "--timeout", "5s")
	if r.code != 1 {
		t.Fatalf("observe with %s down = %d, want 1\n%s%s", k2.addr, r.code, r.stdout, r.stderr)
	}
	contains(t, "observe stdout (one server down)", r.stdout, "not recorded: region us-east: 1 of 2 server(s) unreachable or not serving")
	contains(t, "observe stderr (one server down)", r.stderr, "region us-east: 1 server(s) unreachable")
	if after := usageOf(version(e.record(), v1), "us-east"); !after.GetObservedAt().AsTime().Equal(before.GetObservedAt().AsTime()) || after.GetEncryptCount() != before.GetEncryptCount() {
		t.Errorf("observe with a server down changed the record: %v, was %v", after, before)
	}
}

// TestRotateDue runs rotate --due from cron's point of view: nothing due,
// then the rotation period passes (a version is added, decrypt-only, and
// pushed), the promotion waits for the window ("not yet", exit 0) and then
// happens (and is pushed), the old version waits for its TTL and is then
// disabled, then scheduled for destruction. Every run is idempotent.
func TestRotateDue(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	e.push("us-east")
	k1, k2 := e.kms["us-east"][0], e.kms["us-east"][1]
	v1 := e.encrypt(k1)
	// Every stage bakes 10ms: the rollout's stages, not its bake times,
	// are what this test is about.
	rotateDue := func(args ...string) result {
		return e.mustRC(append([]string{"rotate", "--due", "--bake", "10ms"}, args...)...)
	}
	serials := func() []uint64 {
		return []uint64{e.status(k1).GetBundle().GetSerial(), e.status(k2).GetBundle().GetSerial()}
	}

	r := rotateDue()
	if strings.Contains(r.stdout, "done:") || len(e.record().GetVersions()) != 1 || !slices.Equal(serials(), []uint64{1, 1}) {
		t.Fatalf("rotate --due with nothing due: %q, %d versions, serials %v; want no step, 1 version, serials [1 1]", r.stdout, len(e.record().GetVersions()), serials())
	}

	// The rotation period (1h) passes.
	e.clk.Advance(time.Hour + time.Second)
	r = rotateDue("--dry-run")
	contains(t, "rotate --due --dry-run stdout", r.stdout, "due: keyset "+fleetKeyset+": add a version")
	if n := len(e.record().GetVersions()); n != 1 {
		t.Fatalf("rotate --due --dry-run added a version (%d versions)", n)
	}
	r = rotateDue()
	m := regexp.MustCompile(`done: keyset payments/ledger: added version (\d+) \(enabled, decrypt-only\)`).FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("rotate --due after the rotation period: stdout %q, want a version added", r.stdout)
	}
	var v2 uint32
	fmt.Sscan(m[1], &v2)
	// Staged: the canary (one server) applies and bakes before the rest.
	contains(t, "rotate --due stdout", r.stdout, "dry-run ok, applied 2 (last good 1)", "completed: every stage passed")
	if c, rest := strings.Index(r.stdout, "stage 1/2 canary passed its gates"), strings.Index(r.stdout, "stage 2/2 region us-east: applying"); c < 0 || rest < c {
		t.Errorf("rotate --due did not roll its bundle out canary first (stdout %q)", r.stdout)
	}
	if !slices.Equal(serials(), []uint64{2, 2}) {
		t.Errorf("after the add, serials %v, want [2 2]", serials())
	}
	for _, k := range []*fleetKMS{k1, k2} {
		if got := e.status(k).GetKeysets()[0]; got.GetPrimaryKeyId() != v1 || len(got.GetVersions()) != 2 {
			t.Errorf("%s serves %v, want versions %d (primary) and %d", k.addr, got, v1, v2)
		}
	}

	// Within the window: observed and recorded, promotion not yet (exit 0).
	r = rotateDue()
	contains(t, "rotate --due within the window", r.stdout, "recorded: region us-east",
		fmt.Sprintf("not yet: keyset %s: promote version %d: earliest safe time %s", fleetKeyset, v2, e.clk.Now().Add(fleetWindow).Format(time.RFC3339)))
	if v := version(e.record(), v2); v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED {
		t.Errorf("within the window version %d is %v, want enabled", v2, v.GetState())
	}
	if _, ok := propagated(version(e.record(), v2), "us-east"); !ok {
		t.Errorf("rotate --due did not record version %d's propagation", v2)
	}

	// After the window: promoted and pushed.
	e.clk.Advance(fleetWindow + time.Second)
	promotedAt := e.clk.Now()
	r = rotateDue()
	contains(t, "rotate --due after the window", r.stdout, fmt.Sprintf("done: keyset %s: promoted version %d", fleetKeyset, v2), "dry-run ok, applied 3 (last good 2)", "completed: every stage passed")
	if got := e.encrypt(k2); got != v2 {
		t.Errorf("after the promotion %s encrypts with %d, want %d", k2.addr, got, v2)
	}

	// Again at once: idempotent; version 1 waits for its TTL (2h) and the window.
	r = rotateDue()
	contains(t, "rotate --due after the promotion", r.stdout, fmt.Sprintf("not yet: keyset %s: disable version %d: earliest safe time %s",
		fleetKeyset, v1, promotedAt.Add(2*time.Hour+fleetWindow).Format(time.RFC3339)))
	if strings.Contains(r.stdout, "done:") || !slices.Equal(serials(), []uint64{3, 3}) {
		t.Errorf("rotate --due with nothing due changed something: %q, serials %v", r.stdout, serials())
	}

	// After the TTL: disabled and pushed, then scheduled for destruction.
	e.clk.Advance(2*time.Hour + fleetWindow + time.Second)
	r = rotateDue()
	contains(t, "rotate --due after the TTL", r.stdout, fmt.Sprintf("done: keyset %s: disabled version %d", fleetKeyset, v1), "dry-run ok, applied 4 (last good 3)", "completed: every stage passed")
	r = rotateDue("--destroy-delay", "1h")
	contains(t, "rotate --due after the disable", r.stdout, fmt.Sprintf("done: keyset %s: scheduled version %d for destruction", fleetKeyset, v1))
	if v := version(e.record(), v1); v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_DESTROY_SCHEDULED {
		t.Errorf("version %d is %v, want destroy-scheduled", v1, v.GetState())
	}
	for _, k := range []*fleetKMS{k1, k2} {
		for _, v := range e.status(k).GetKeysets()[0].GetVersions() {
			if v.GetKeyId() == v1 && (v.GetStatus().String() == "KEY_STATUS_ENABLED" || v.GetStatus().String() == "KEY_STATUS_PRIMARY") {
				t.Errorf("%s still serves version %d decrypting after the disable was pushed", k.addr, v1)
			}
		}
	}
}

// TestRotateDueTwoWaitingVersions: two versions were added and waited to
// be promoted; rotate --due promotes the newer (v3). The older one (v2) no
// longer waits: it was added before the primary, and promoting it on the
// next run would put an older key back over v3 (and its age would make a
// rotation due at once). It is an enabled, decrypt-only version.
func TestRotateDueTwoWaitingVersions(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 1})
	e.push("us-east")
	k := e.kms["us-east"][0]
	e.mustRC("keyset", "rotate", fleetKeyset)
	e.mustRC("keyset", "rotate", fleetKeyset)
	e.push("us-east")
	vs := e.record().GetVersions()
	if len(vs) != 3 {
		t.Fatalf("after two keyset rotate the record has %d versions, want 3", len(vs))
	}
	v2, v3 := vs[1].GetKeyId(), vs[2].GetKeyId()
	e.mustRC("observe")
	e.clk.Advance(fleetWindow + time.Second)

	for run := 1; run <= 2; run++ {
		r := e.mustRC("rotate", "--due", "--bake", "10ms")
		if run == 1 {
			contains(t, "rotate --due stdout (first run)", r.stdout, fmt.Sprintf("done: keyset %s: promoted version %d", fleetKeyset, v3))
		}
		if regexp.MustCompile(fmt.Sprintf(`promoted? version %d\b`, v2)).MatchString(r.stdout) || strings.Contains(r.stdout, "added version") {
			t.Errorf("rotate --due run %d: %q; want v2 (%d) never promoted and no version added", run, r.stdout, v2)
		}
		rec := e.record()
		if got := version(rec, v3).GetState(); got != statev1.KeysetVersionState_KEYSET_VERSION_STATE_PRIMARY || len(rec.GetVersions()) != 3 {
			t.Errorf("after rotate --due run %d: version %d is %v, %d versions; want it primary, 3 versions", run, v3, got, len(rec.GetVersions()))
		}
		if got := e.encrypt(k); got != v3 {
			t.Errorf("after rotate --due run %d %s encrypts with %d, want %d", run, k.addr, got, v3)
		}
	}
}

// TestRotateDueRollsOutRegionByRegion: the bundles rotate --due builds
// for several regions go out as one staged rollout (the 2014 outage was a
// change pushed everywhere at once): while the first region bakes, the
// other still serves its old bundle. A rotate --due that meets a rollout in
// flight for a region it would change records its steps, changes no server
// and says which rollout is in the way; once that rollout is done, the
// next run rolls the change out.
func TestRotateDueRollsOutRegionByRegion(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 1, "eu-west": 1})
	e.push("us-east")
	e.push("eu-west")
	us, eu := e.kms["us-east"][0], e.kms["eu-west"][0]
	serials := func() [2]uint64 {
		return [2]uint64{e.status(us).GetBundle().GetSerial(), e.status(eu).GetBundle().GetSerial()}
	}

	if r := e.rc("rotate", "--due", "--order", "us-east,mars"); r.code != 2 || !strings.Contains(r.stderr, `region "mars" has no KMS servers`) {
		t.Errorf("rotate --due --order naming an unknown region = %d, %q; want a usage error naming it", r.code, r.stderr)
	}

	e.clk.Advance(time.Hour + time.Second)
	// A rotation is due. A misspelled --no-push region would hold nothing
	// back: it is refused as one of --order is, before anything is done.
	versions := len(e.record().GetVersions())
	if r := e.rc("rotate", "--due", "--no-push", "eu-wset"); r.code != 2 || !strings.Contains(r.stderr, `--no-push: region "eu-wset" has no KMS servers`) {
		t.Errorf("rotate --due --no-push naming an unknown region = %d, %q; want a usage error naming it", r.code, r.stderr)
	}
	if got := serials(); got != [2]uint64{1, 1} || len(e.record().GetVersions()) != versions {
		t.Errorf("after the refused rotate --due: serials %v, %d versions; want [1 1], %d (nothing changed)", got, len(e.record().GetVersions()), versions)
	}

	var atBakes [][2]uint64
	e.onBake = func(time.Duration) error { atBakes = append(atBakes, serials()); return nil }
	r := e.mustRC("rotate", "--due", "--bake", "1m", "--order", "us-east,eu-west")
	contains(t, "rotate --due stdout", r.stdout, "done: keyset "+fleetKeyset+": added version", "stage 1/2 canary: us-east", "stage 2/2 wave 1: eu-west", "completed: every stage passed")
	if want := [][2]uint64{{2, 1}, {2, 2}}; !slices.Equal(atBakes, want) {
		t.Errorf("serials (us-east, eu-west) at each bake = %v, want %v: us-east alone first, then eu-west", atBakes, want)
	}

	// A rollout of the same bundles, stopped in its canary bake, stays in
	// flight.
	e.mustRC("observe") // every region serves the new version: promotable after the window
	e.clk.Advance(fleetWindow + time.Second)
	out := filepath.Join(e.dir, "next-us.bundle")
	e.mustRC("bundle", "build", "--region", "us-east", "--out", out)
	e.onBake = func(time.Duration) error { return context.Canceled }
	r = e.rc("rollout", "start", "--bundles", out, "--bake", "1m", "--reason", "held in its bake")
	id := regexp.MustCompile(`rollout (\S+) stored`).FindStringSubmatch(r.stdout)
	if r.code == 0 || id == nil {
		t.Fatalf("rollout start stopped in its bake = %d, want an error and a stored rollout\n%s%s", r.code, r.stdout, r.stderr)
	}
	e.onBake = nil
	before := serials()
	versions = len(e.record().GetVersions())
	r = e.rc("rotate", "--due", "--bake", "1m")
	if r.code != 1 {
		t.Fatalf("rotate --due with rollout %s in flight = %d, want 1\n%s%s", id[1], r.code, r.stdout, r.stderr)
	}
	contains(t, "rotate --due stdout (rollout in flight)", r.stdout, "done: keyset "+fleetKeyset+": promoted version")
	contains(t, "rotate --due stderr (rollout in flight)", r.stderr, id[1])
	if got := serials(); got != before || len(e.record().GetVersions()) != versions {
		t.Errorf("rotate --due with a rollout in flight: serials %v (were %v), %d versions (were %d); want no server changed", got, before, len(e.record().GetVersions()), versions)
	}

	e.mustRC("rollout", "resume", id[1])
	r = e.mustRC("rotate", "--due", "--bake", "1m")
	contains(t, "rotate --due after the rollout in flight ended", r.stdout, "behind the record: region", "completed: every stage passed")
	for _, k := range []*fleetKMS{us, eu} {
		ks := e.status(k).GetKeysets()[0]
		if vs := e.record().GetVersions(); ks.GetPrimaryKeyId() != vs[len(vs)-1].GetKeyId() {
			t.Errorf("%s's primary is %d, want the promoted version %d", k.addr, ks.GetPrimaryKeyId(), vs[len(vs)-1].GetKeyId())
		}
	}
}

// TestRotateDueUnreachable: a server that does not answer stops nothing
// from being judged safely: nothing is recorded for its region, no step that
// depends on it is taken, and rotate exits 1.
func TestRotateDueUnreachable(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	e.push("us-east")
	e.mustRC("keyset", "rotate", fleetKeyset)
	e.push("us-east")
	e.mustRC("observe")
	e.clk.Advance(fleetWindow + time.Second)
	e.kms["us-east"][1].Stop()
	r := e.rc("rotate", "--due", "--timeout", "5s")
	if r.code != 1 {
		t.Fatalf("rotate --due with a server down = %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
	contains(t, "rotate --due stdout", r.stdout, "not recorded: region us-east: 1 of 2", "not yet: keyset "+fleetKeyset+": promote version")
	contains(t, "rotate --due stderr", r.stderr, "unreachable")
	if vs := e.record().GetVersions(); len(vs) != 2 || vs[1].GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED {
		t.Errorf("with a server of the region unreachable, the record's versions are %v; want the new one still enabled (not promoted)", vs)
	}
}

func TestClusterStatusAndSnapshot(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 1})
	// The replica registers its API address with a Raft write after it
	// starts leading: wait for it.
	var r result
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		r = e.mustRC("cluster", "status")
		if strings.Contains(r.stdout, "("+e.chain.Addr+")") || time.Now().After(deadline) {
			break
		}
	}
	contains(t, "cluster status stdout", r.stdout, e.chain.Addr+": rootkms-1 LEADER, leader rootkms-1 ("+e.chain.Addr+")", "root key true", "MEMBER")
	if !regexp.MustCompile(`rootkms-1\s+VOTER\s+127\.0\.0\.1:\d+\s+` + regexp.QuoteMeta(e.chain.Addr)).MatchString(r.stdout) {
		t.Errorf("cluster status stdout = %q, want rootkms-1 a voter with its Raft and API addresses", r.stdout)
	}
	r = e.mustRC("cluster", "status", "--json")
	var st struct {
		ID         string `json:"id"`
		State      string `json:"state"`
		HasRootKey bool   `json:"hasRootKey"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil || st.ID != "rootkms-1" || st.State != "REPLICA_STATE_LEADER" || !st.HasRootKey {
		t.Errorf("cluster status --json = %+v (%v), want rootkms-1 leader with the root key:\n%s", st, err, r.stdout)
	}
	// One replica of two does not answer: the other is still shown; exit 1.
	dead := deadAddr(t)
	r = e.rc("cluster", "status", "--rootkms", e.chain.Addr+","+dead, "--timeout", "3s")
	if r.code != 1 || !strings.Contains(r.stdout, e.chain.Addr+": rootkms-1 LEADER") || !strings.Contains(r.stderr, dead) {
		t.Errorf("cluster status with %s dead = %d, %q, %q; want 1, the live replica shown, the dead one named", dead, r.code, r.stdout, r.stderr)
	}

	// Snapshots are for operators (operator/*/* by default), not regionctl.
	r = e.rc("cluster", "snapshot")
	if r.code != 1 || !strings.Contains(r.stderr, "PermissionDenied") {
		t.Errorf("cluster snapshot as regionctl = %d, %q; want 1, PermissionDenied", r.code, r.stderr)
	}
	op := identityFlags(e.pki, "spiffe://cairn.test/operator/global/operator")
	r = e.mustRC(append([]string{"cluster", "snapshot"}, op...)...)
	if !regexp.MustCompile(regexp.QuoteMeta(e.chain.Addr) + `: snapshot at index \d+, term \d+`).MatchString(r.stdout) {
		t.Errorf("cluster snapshot as an operator printed %q, want the snapshot's index and term", r.stdout)
	}
}

// deadAddr is a loopback address nothing listens on.
func deadAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

// TestRegionRotateAndRetireKey: a region key version retires only once no
// keyset copy is under it and the region's servers were seen serving a
// bundle that does not need it.
func TestRegionRotateAndRetireKey(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 2})
	e.push("us-east")
	r := e.mustRC("region", "rotate-key", "--region", "us-east")
	contains(t, "region rotate-key stdout", r.stdout, "region us-east rotated", "primary master key version 2", "1 (ENABLED), 2 (PRIMARY)")

	retire := func() result { return e.rc("region", "retire-key", "--region", "us-east", "--version", "1") }
	r = retire()
	if r.code != 1 || !strings.Contains(r.stderr, "REFUSED by the root KMS") || !strings.Contains(r.stderr, "still encrypts the copies of 1 keyset(s) (["+fleetKeyset+"])") {
		t.Errorf("retire-key 1 with a copy under it = %d, %q; want refused naming %s", r.code, r.stderr, fleetKeyset)
	}
	e.mustRC("keyset", "rewrap", fleetKeyset)
	r = retire()
	if r.code != 1 || !strings.Contains(r.stderr, "never observed") {
		t.Errorf("retire-key 1 before any observation = %d, %q; want refused: never observed", r.code, r.stderr)
	}
	e.mustRC("observe")
	r = retire()
	if r.code != 1 || !strings.Contains(r.stderr, "serving a bundle that needs it") {
		t.Errorf("retire-key 1 while the servers serve a bundle under it = %d, %q; want refused", r.code, r.stderr)
	}
	r = e.rc("region", "retire-key", "--region", "us-east", "--version", "2")
	if r.code != 1 || !strings.Contains(r.stderr, "is primary") {
		t.Errorf("retire-key of the primary = %d, %q; want refused: is primary", r.code, r.stderr)
	}

	// The rewrapped bundle served everywhere and observed: version 1 retires.
	e.push("us-east")
	for _, k := range e.kms["us-east"] {
		if got := e.status(k).GetRegionKeyVersions(); !slices.Equal(got, []uint32{2}) {
			t.Errorf("%s needs region key versions %v, want [2]", k.addr, got)
		}
	}
	// Observed after version 1 was superseded (the root KMS refuses an
	// observation that may predate bundles made under it).
	e.clk.Advance(time.Second)
	e.mustRC("observe")
	r = e.mustRC("region", "retire-key", "--region", "us-east", "--version", "1")
	contains(t, "region retire-key stdout", r.stdout, "key version retired", "1 (DISABLED), 2 (PRIMARY)")
	if got := e.encrypt(e.kms["us-east"][0]); got == 0 {
		t.Errorf("Encrypt after the retirement returned key ID 0")
	}
}

// TestDisableKeepsAHeldBackRegionsPrimary: a region held back from a
// promotion (--no-push) still encrypts with the old primary, however long
// it has not. keyset disable, which the root KMS judges on the record and
// the observations regionctl records there, must not take that version out
// of the decrypt set once its TTL has passed in the record: the
// observation says the region serves it as primary. Once the region has
// the promotion (and the TTL has passed since), it may.
func TestDisableKeepsAHeldBackRegionsPrimary(t *testing.T) {
	e := newFleetEnv(t, map[string]int{"us-east": 1, "eu-west": 1})
	e.push("us-east")
	e.push("eu-west")
	us, eu := e.kms["us-east"][0], e.kms["eu-west"][0]
	v1 := e.encrypt(us)
	rotateDue := func(args ...string) result {
		return e.mustRC(append([]string{"rotate", "--due", "--bake", "10ms"}, args...)...)
	}
	disable := func() result {
		return e.rc("keyset", "disable", fleetKeyset, "--version", fmt.Sprint(v1))
	}

	e.clk.Advance(time.Hour + time.Second)
	rotateDue() // adds v2 decrypt-only in both regions
	rotateDue() // records its propagation
	e.clk.Advance(fleetWindow + time.Second)
	r := rotateDue("--no-push", "eu-west")
	contains(t, "rotate --due --no-push eu-west", r.stdout, "promoted version", "not rolled out: region eu-west (--no-push)")
	if got := e.status(eu).GetKeysets()[0].GetPrimaryKeyId(); got != v1 {
		t.Fatalf("eu-west serves %d as primary, want %d (held back)", got, v1)
	}

	// The TTL and the window pass with no traffic in eu-west; both regions
	// are observed afresh.
	e.clk.Advance(2*time.Hour + fleetWindow + time.Second)
	e.mustRC("observe")
	r = disable()
	if r.code != 1 || !strings.Contains(r.stderr, "eu-west") || !strings.Contains(r.stderr, "serves it as primary") {
		t.Fatalf("keyset disable while eu-west serves it as primary = %d, %q; want 1, naming eu-west", r.code, r.stderr)
	}
	if v := version(e.record(), v1); v.GetState() != statev1.KeysetVersionState_KEYSET_VERSION_STATE_ENABLED {
		t.Fatalf("after the refused disable version %d is %v, want enabled", v1, v.GetState())
	}

	// eu-west gets the promotion; the old version then waits for the TTL
	// from when eu-west last encrypted with it.
	e.encrypt(eu)
	rotateDue()
	if got := e.status(eu).GetKeysets()[0].GetPrimaryKeyId(); got == v1 {
		t.Fatalf("after rotate --due without --no-push, eu-west still serves %d as primary", v1)
	}
	e.clk.Advance(2*time.Hour + fleetWindow + time.Second)
	e.mustRC("observe")
	if r := disable(); r.code != 0 {
		t.Fatalf("keyset disable once every region has the promotion = %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}
