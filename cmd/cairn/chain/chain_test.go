package chain

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/regionctl/config"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestPortPlan(t *testing.T) {
	for _, regions := range [][]string{{"us-east"}, DefaultRegions, {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}} {
		t.Run(strings.Join(regions, ","), func(t *testing.T) {
			const base = 7100
			plan := PortPlan(base, regions)
			if got, want := len(plan), 2*numDistributors+3*numRootKMS+3*kmsPerRegion*len(regions); got != want {
				t.Fatalf("PortPlan(%d, %v) has %d ports, want %d", base, regions, got, want)
			}
			seen := map[int]bool{}
			for _, p := range plan {
				if seen[p.Port] {
					t.Errorf("port %d planned twice", p.Port)
				}
				seen[p.Port] = true
				if p.Port <= base || p.Port > base+lastOffset(len(regions)) {
					t.Errorf("port %d (%s %s) outside (%d, %d]", p.Port, p.Component, p.Purpose, base, base+lastOffset(len(regions)))
				}
				if p.Addr() != "127.0.0.1:"+strconv.Itoa(p.Port) {
					t.Errorf("Addr() = %q", p.Addr())
				}
			}
		})
	}
	// The fixed offsets are part of the interface (the README, other chains
	// on the machine): pin them.
	want := map[int]string{
		7101: "distributor-1 gRPC", 7103: "distributor-3 gRPC",
		7111: "rootkms-1 gRPC", 7113: "rootkms-3 gRPC", 7121: "rootkms-1 Raft", 7123: "rootkms-3 Raft",
		7131: "us-east/kms-1 gRPC", 7132: "us-east/kms-2 gRPC", 7133: "eu-west/kms-1 gRPC", 7134: "eu-west/kms-2 gRPC",
		7151: "us-east/kms-1 metrics", 7154: "eu-west/kms-2 metrics",
		7106: "distributor-1 metrics", 7108: "distributor-3 metrics", 7116: "rootkms-1 metrics", 7118: "rootkms-3 metrics",
		7171: "us-east/kms-1 transit", 7174: "eu-west/kms-2 transit",
	}
	got := map[int]string{}
	for _, p := range PortPlan(7100, DefaultRegions) {
		got[p.Port] = p.Component + " " + p.Purpose
	}
	for port, w := range want {
		if got[port] != w {
			t.Errorf("PortPlan(7100, default)[%d] = %q, want %q", port, got[port], w)
		}
	}
}

func TestCheckPorts(t *testing.T) {
	plan := PortPlan(freeBase(t, 2), DefaultRegions)
	if err := checkPorts(plan); err != nil {
		t.Fatalf("checkPorts(free plan) = %v", err)
	}
	i := slices.IndexFunc(plan, func(p Port) bool { return p.Component == "rootkms-2" && p.Purpose == "gRPC" })
	if i < 0 {
		t.Fatalf("PortPlan has no rootkms-2 gRPC port: %v", plan)
	}
	taken := plan[i]
	l, err := net.Listen("tcp", taken.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = checkPorts(plan)
	var pt *PortsTakenError
	if !errors.As(err, &pt) || len(pt.Taken) != 1 || pt.Taken[0].Port != taken {
		t.Fatalf("checkPorts with %d taken = %v, want a PortsTakenError naming only it", taken.Port, err)
	}
	for _, want := range []string{fmt.Sprintf("port %d (rootkms-2 gRPC)", taken.Port), "is taken", "cairn up", "--base-port"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("checkPorts error %q does not contain %q", err, want)
		}
	}
	// What checkPorts held is released: the plan's other ports are free.
	for _, p := range plan {
		if p == taken {
			continue
		}
		l, err := net.Listen("tcp", p.Addr())
		if err != nil {
			t.Errorf("after checkPorts, port %d is not free: %v", p.Port, err)
			continue
		}
		l.Close()
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{StateDir: "s", BinDir: "b"}
	tests := []struct {
		name string
		edit func(*Config)
		want string // "" means valid
	}{
		{"minimal", func(*Config) {}, ""},
		{"everything", func(c *Config) {
			c.BasePort, c.TrustDomain, c.Safes, c.Regions = 9000, "dev.example", SafesSoftHSM, []string{"ap-south"}
		}, ""},
		{"no state dir", func(c *Config) { c.StateDir = " " }, "no state dir"},
		{"no bin dir", func(c *Config) { c.BinDir = "" }, "no bin dir"},
		{"privileged base port", func(c *Config) { c.BasePort = 80 }, "base port 80"},
		{"base port too high", func(c *Config) { c.BasePort = 65500 }, "pick a base port from 1024 to 65461"},
		{"bad trust domain", func(c *Config) { c.TrustDomain = "Bad Domain" }, `trust domain "Bad Domain"`},
		{"bad safes", func(c *Config) { c.Safes = "hsm" }, `safes "hsm"`},
		{"empty regions", func(c *Config) { c.Regions = []string{} }, "no regions"},
		{"bad region", func(c *Config) { c.Regions = []string{"US"} }, `region "US"`},
		{"global region", func(c *Config) { c.Regions = []string{"global"} }, `"global" is reserved`},
		{"duplicate region", func(c *Config) { c.Regions = []string{"a", "a"} }, `"a" listed twice`},
		{"too many regions", func(c *Config) {
			for i := range MaxRegions + 1 {
				c.Regions = append(c.Regions, fmt.Sprintf("r%d", i))
			}
		}, "at most 10"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.edit(&c)
			err := c.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("Validate() = %v, want an error containing %q", err, tt.want)
			case err != nil && !strings.HasPrefix(err.Error(), "chain: "):
				t.Errorf("Validate() = %q, want it prefixed with \"chain: \"", err)
			}
		})
	}
}

func TestResolve(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString
	rec := &setupRecord{Version: 1, TrustDomain: "made.test", Regions: []string{"ap-south"}, Safes: SafesFile, BasePort: 9100}
	tests := []struct {
		name    string
		cfg     Config
		rec     *setupRecord
		softhsm bool
		want    settings
		wantErr string
	}{
		{"first run defaults, no SoftHSM2", Config{}, nil, false,
			settings{BasePort: 7100, TrustDomain: td("cairn.local"), Regions: DefaultRegions, Safes: SafesFile}, ""},
		{"first run auto with SoftHSM2", Config{Safes: SafesAuto}, nil, true,
			settings{BasePort: 7100, TrustDomain: td("cairn.local"), Regions: DefaultRegions, Safes: SafesSoftHSM}, ""},
		{"first run file despite SoftHSM2", Config{Safes: SafesFile, BasePort: 8000, TrustDomain: "x.test", Regions: []string{"r1"}, Demo: true}, nil, true,
			settings{BasePort: 8000, TrustDomain: td("x.test"), Regions: []string{"r1"}, Safes: SafesFile, Demo: true}, ""},
		{"first run softhsm without SoftHSM2", Config{Safes: SafesSoftHSM}, nil, false, settings{}, "SoftHSM2 is not installed"},
		{"re-run takes the record", Config{Demo: true}, rec, true,
			settings{BasePort: 9100, TrustDomain: td("made.test"), Regions: []string{"ap-south"}, Safes: SafesFile, Rerun: true, Demo: true}, ""},
		{"re-run with the same values", Config{BasePort: 9100, TrustDomain: "made.test", Regions: []string{"ap-south"}, Safes: SafesFile}, rec, false,
			settings{BasePort: 9100, TrustDomain: td("made.test"), Regions: []string{"ap-south"}, Safes: SafesFile, Rerun: true}, ""},
		{"re-run on other ports", Config{BasePort: 9200}, rec, false, settings{}, "was made with --base-port 9100, not 9200"},
		{"re-run in another trust domain", Config{TrustDomain: "other.test"}, rec, false, settings{}, "--trust-domain made.test, not other.test"},
		{"re-run with other regions", Config{Regions: []string{"us-east"}}, rec, false, settings{}, "--regions ap-south, not us-east"},
		{"re-run with other safes", Config{Safes: SafesSoftHSM}, rec, true, settings{}, "--safes file, not softhsm"},
		{"re-run of SoftHSM2 safes without SoftHSM2", Config{}, &setupRecord{Version: 1, TrustDomain: "made.test", Regions: []string{"a"}, Safes: SafesSoftHSM, BasePort: 9100}, false,
			settings{}, "SoftHSM2 is not installed now"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := resolve(tt.cfg, tt.rec, "/state", "/bin", tt.softhsm)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("resolve() error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("resolve() = %v", err)
			}
			tt.want.StateDir, tt.want.BinDir = "/state", "/bin"
			if diff := cmp.Diff(tt.want, got, cmp.Comparer(func(a, b spiffeid.TrustDomain) bool { return a == b })); diff != "" {
				t.Errorf("resolve() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestInspectState(t *testing.T) {
	t.Run("missing", func(t *testing.T) {
		if rec, err := inspectState(filepath.Join(t.TempDir(), "nope")); rec != nil || err != nil {
			t.Errorf("inspectState(missing) = %v, %v, want nil, nil (a first run)", rec, err)
		}
	})
	t.Run("empty", func(t *testing.T) {
		if rec, err := inspectState(t.TempDir()); rec != nil || err != nil {
			t.Errorf("inspectState(empty) = %v, %v, want nil, nil (a first run)", rec, err)
		}
	})
	t.Run("a file", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "f")
		writeFile(t, f, "x")
		if _, err := inspectState(f); err == nil {
			t.Errorf("inspectState(a file) = nil error, want one")
		}
	})
	t.Run("unfinished", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "certs", "ca.pem"), "x")
		writeFile(t, filepath.Join(dir, "genesis.json"), "{}")
		_, err := inspectState(dir)
		if !errors.Is(err, ErrUnfinished) {
			t.Fatalf("inspectState(no setup.json) = %v, want ErrUnfinished", err)
		}
		for _, want := range []string{"state dir " + dir + " is from an unfinished run", "remove it (rm -rf " + dir + ")", "--state-dir"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
	})
	t.Run("not ours", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "certs", "ca.pem"), "x")
		writeFile(t, filepath.Join(dir, "thesis.tex"), "x")
		_, err := inspectState(dir)
		if err == nil || errors.Is(err, ErrUnfinished) || strings.Contains(err.Error(), "rm -rf") || !strings.Contains(err.Error(), `not made by cairn up (it holds "thesis.tex")`) {
			t.Errorf("inspectState(a foreign dir) = %v, want an error that does not suggest removing it", err)
		}
	})
	complete := func(t *testing.T) string {
		dir := t.TempDir()
		l := layout{dir}
		rec := &setupRecord{TrustDomain: "cairn.local", Regions: DefaultRegions, Safes: SafesFile, BasePort: 7100, GenesisID: "g", CreatedAt: time.Unix(1e9, 0).UTC()}
		if err := writeSetupRecord(l.setup(), rec); err != nil {
			t.Fatal(err)
		}
		files := []string{filepath.Join(l.certs(), "ca.pem"), l.manifest(), l.signingPub()}
		for i := 1; i <= numSafes; i++ {
			files = append(files, l.safeConfig(i))
		}
		for i := 1; i <= numDistributors; i++ {
			files = append(files, filepath.Join(l.distributor(i), "genesis.json"))
		}
		for i := 1; i <= numRootKMS; i++ {
			files = append(files, filepath.Join(l.rootKMS(i), "raft.db"))
		}
		for _, f := range files {
			writeFile(t, f, "x")
		}
		return dir
	}
	t.Run("complete", func(t *testing.T) {
		dir := complete(t)
		rec, err := inspectState(dir)
		if err != nil {
			t.Fatalf("inspectState(complete) = %v", err)
		}
		want := &setupRecord{Version: 1, TrustDomain: "cairn.local", Regions: DefaultRegions, Safes: SafesFile, BasePort: 7100, GenesisID: "g", CreatedAt: time.Unix(1e9, 0).UTC()}
		if diff := cmp.Diff(want, rec); diff != "" {
			t.Errorf("inspectState(complete) mismatch (-want +got):\n%s", diff)
		}
	})
	t.Run("damaged", func(t *testing.T) {
		dir := complete(t)
		if err := os.Remove(filepath.Join(dir, "rootkms-2", "raft.db")); err != nil {
			t.Fatal(err)
		}
		_, err := inspectState(dir)
		if err == nil || !strings.Contains(err.Error(), "is damaged") || !strings.Contains(err.Error(), "rootkms-2/raft.db") {
			t.Errorf("inspectState(no rootkms-2/raft.db) = %v, want a damaged state dir naming it", err)
		}
	})
	t.Run("bad setup record", func(t *testing.T) {
		for name, content := range map[string]string{
			"not json":      "{",
			"version 2":     `{"version": 2, "safes": "file"}`,
			"unknown safes": `{"version": 1, "safes": "tpm"}`,
			"unknown field": `{"version": 1, "safes": "file", "extra": 1}`,
		} {
			dir := complete(t)
			writeFile(t, layout{dir}.setup(), content)
			if _, err := inspectState(dir); err == nil || !strings.Contains(err.Error(), "setup.json") {
				t.Errorf("inspectState(setup.json %s) = %v, want an error naming setup.json", name, err)
			}
		}
	})
}

func TestInfoRoundTrip(t *testing.T) {
	dir := t.TempDir()
	info := Info{
		StateDir: dir, TrustDomain: "cairn.local", BasePort: 7100, Safes: SafesFile, LauncherPID: 42,
		StartedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), CA: "/c/ca.pem", CertsDir: "/c", Manifest: "/m", BundleSigningPub: "/k.pub",
		Components: []Component{
			{Name: "distributor-1", Kind: "distributor", SPIFFEID: "spiffe://cairn.local/distributor/global/distributor-1", Address: "127.0.0.1:7101", PID: 7, Log: "/l", StateDir: "/d"},
			{Name: "rootkms-1", Kind: "rootkms", SPIFFEID: "spiffe://cairn.local/rootkms/global/rootkms-1", Address: "127.0.0.1:7111", RaftAddress: "127.0.0.1:7121", PID: 8, Log: "/l2", StateDir: "/r"},
			{Name: "us-east/kms-1", Kind: "kms", Region: "us-east", SPIFFEID: "spiffe://cairn.local/kms/us-east/kms-1", Address: "127.0.0.1:7131", MetricsAddress: "127.0.0.1:7151", PID: 9, Log: "/l3", StateDir: "/k"},
		},
		Regions: []Region{{Name: "us-east", KMS: []string{"127.0.0.1:7131", "127.0.0.1:7132"}, Keysets: []string{KeyURI("us-east", notesKeyset)}, Bundle: "/b",
			Client: Identity{SPIFFEID: "spiffe://cairn.local/client/us-east/demo", Cert: "/cert", Key: "/key", CA: "/c/ca.pem"}}},
		Regionctl: Regionctl{Identity: Identity{SPIFFEID: "spiffe://cairn.local/regionctl/global/regionctl"}, IdentityFlags: []string{"--name", "regionctl/global/regionctl"},
			RootKMS: []string{"127.0.0.1:7111"}, Teams: "/t", SigningKey: "/k"},
	}
	if err := info.write(); err != nil {
		t.Fatal(err)
	}
	got, err := Load(dir)
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	if diff := cmp.Diff(&info, got); diff != "" {
		t.Errorf("Load() after write mismatch (-want +got):\n%s", diff)
	}
	if r, ok := got.Region("us-east"); !ok || r.Client.Cert != "/cert" {
		t.Errorf("Region(us-east) = %v, %v", r, ok)
	}
	if _, ok := got.Region("eu-west"); ok {
		t.Errorf("Region(eu-west) found, want not")
	}
	if fi, err := os.Stat(filepath.Join(dir, InfoFile)); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("chain.json: %v, %v, want mode 0644", fi, err)
	}

	if _, err := Load(t.TempDir()); !errors.Is(err, ErrNoChain) || !strings.Contains(err.Error(), "make up") {
		t.Errorf("Load(no chain.json) = %v, want ErrNoChain saying how to start one", err)
	}
	for name, content := range map[string]string{
		"not json":   "[",
		"version 2":  `{"version": 2, "trust_domain": "t", "ca": "c", "regions": [{"name": "r", "kms": ["a"]}]}`,
		"no regions": `{"version": 1, "trust_domain": "t", "ca": "c"}`,
		"no kms":     `{"version": 1, "trust_domain": "t", "ca": "c", "regions": [{"name": "r"}]}`,
	} {
		d := t.TempDir()
		writeFile(t, filepath.Join(d, InfoFile), content)
		if _, err := Load(d); err == nil || !strings.HasPrefix(err.Error(), "chain: ") {
			t.Errorf("Load(%s) = %v, want a chain: error", name, err)
		}
	}
}

func TestRunStepsFailure(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "x.log")
	var log strings.Builder
	for i := 1; i <= 30; i++ {
		fmt.Fprintf(&log, "log line %d\n", i)
	}
	writeFile(t, logPath, log.String())
	ran := 0
	steps := []step{
		{"first thing", func() (string, error) { ran++; return "fine", nil }},
		{"second thing", func() (string, error) {
			ran++
			return "", fmt.Errorf("chain: wrapped: %w", &logError{err: errors.New("chain: x: boom\nsecond line"), name: "x", log: logPath})
		}},
		{"third thing", func() (string, error) { ran++; return "", nil }},
	}
	var out bytes.Buffer
	err := runSteps(&out, steps)
	if err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("runSteps() = %v, want the second step's error", err)
	}
	if ran != 2 {
		t.Errorf("runSteps ran %d steps, want 2 (none after the failure)", ran)
	}
	got := out.String()
	for _, want := range []string{
		"[1/3] first thing ... ok (", "s): fine\n",
		"[2/3] second thing ... FAILED (",
		"  error: chain: wrapped: chain: x: boom\n         second line\n",
		"  last lines of x's log (" + logPath + "):\n",
		"    | log line 11\n", "    | log line 30\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("runSteps output does not contain %q:\n%s", want, got)
		}
	}
	for _, notWant := range []string{"log line 10\n", "third thing"} {
		if strings.Contains(got, notWant) {
			t.Errorf("runSteps output contains %q:\n%s", notWant, got)
		}
	}
}

func TestRunStepsOK(t *testing.T) {
	var steps []step
	for i := range 11 {
		steps = append(steps, step{fmt.Sprintf("step %d", i+1), func() (string, error) { return "", nil }})
	}
	var out bytes.Buffer
	if err := runSteps(&out, steps); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 11 || !strings.HasPrefix(lines[0], "[ 1/11] step 1 ... ok (0.0s)") || !strings.HasPrefix(lines[10], "[11/11] step 11 ... ok (") {
		t.Errorf("runSteps output:\n%s\nwant 11 aligned ok lines", out.String())
	}
}

func TestDemoTeamFileIsValid(t *testing.T) {
	dir := t.TempDir()
	regions := []string{"us-east", "eu-west"}
	if err := writeDemoTeam(dir, regions); err != nil {
		t.Fatal(err)
	}
	teams, bad, err := config.LoadDir(dir, spiffeid.RequireTrustDomainFromString("cairn.local"))
	if err != nil || len(bad) != 0 || len(teams) != 1 {
		t.Fatalf("config.LoadDir(demo team) = %v, %v, %v; want one valid team", teams, bad, err)
	}
	var names []string
	clients := []string{"client/us-east/*", "client/eu-west/*"}
	for _, k := range teams[0].Keysets {
		names = append(names, k.Name)
		if !slices.Equal(k.Regions, regions) {
			t.Errorf("%s regions = %v, want %v", k.Name, k.Regions, regions)
		}
		if !slices.Equal(k.ACL.Encrypt, clients) || !slices.Equal(k.ACL.Decrypt, clients) {
			t.Errorf("%s ACL = %+v, want encrypt and decrypt for %v", k.Name, k.ACL, clients)
		}
		if len(k.ACL.Rewrap) != 0 {
			t.Errorf("%s allows rewrap to %v, want nobody", k.Name, k.ACL.Rewrap)
		}
	}
	if !slices.Equal(names, demoKeysets) {
		t.Errorf("keysets = %v, want %v", names, demoKeysets)
	}
}

// TestProcessLifecycle runs real (tiny) processes through the launcher's
// process handling: a clean stop, one that ignores SIGTERM and is killed
// after the grace period, and one that dies on its own, which Wait reports.
func TestProcessLifecycle(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var out bytes.Buffer
	c := &Chain{layout: layout{dir}, out: &out, log: slog.New(slog.DiscardHandler), died: make(chan struct{}, 1), termTimeout: 300 * time.Millisecond}
	mk := func(name, script string) *proc {
		return &proc{Component: Component{Name: name, Log: filepath.Join(dir, "logs", name+".log")}, path: sh, args: []string{"-c", script}}
	}
	polite := mk("polite", `echo started; exec sleep 60`)
	stubborn := mk("stubborn", `trap "" TERM; echo started; exec sleep 60`)
	for _, p := range []*proc{polite, stubborn} {
		if err := c.start(p); err != nil {
			t.Fatal(err)
		}
	}
	// Both run until told: Wait returns nil when its context ends.
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	if err := c.Wait(ctx); err != nil {
		t.Errorf("Wait() with both running = %v, want nil", err)
	}
	cancel()
	waitForLog(t, stubborn.Log, "started") // its trap is set

	// A third one dies on its own: Wait names it and its log.
	dying := mk("dying", `echo "fatal: out of luck" >&2; exit 3`)
	if err := c.start(dying); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	werr := c.Wait(ctx)
	var le *logError
	if werr == nil || !strings.Contains(werr.Error(), "dying: exited unexpectedly") || !strings.Contains(werr.Error(), "exit status 3") ||
		!errors.As(werr, &le) || le.log != dying.Log {
		t.Errorf("Wait() after a death = %v, want dying's exit 3 with its log", werr)
	}
	// The others keep running, and the death is reported once.
	if n := c.Running(); n != 2 {
		t.Errorf("Running() after one of three died = %d, want 2", n)
	}
	ctx2, cancel2 := context.WithTimeout(t.Context(), 200*time.Millisecond)
	if err := c.Wait(ctx2); err != nil {
		t.Errorf("second Wait() after one death = %v, want nil (reported once)", err)
	}
	cancel2()

	serr := c.Stop(t.Context())
	got := out.String()
	for _, want := range []string{
		fmt.Sprintf("dying (pid %d) had already exited: exit 3", dying.PID),
		fmt.Sprintf("killed stubborn (pid %d): did not exit within 300ms of SIGTERM; SIGKILL", stubborn.PID),
		fmt.Sprintf("stopped polite (pid %d): killed by SIGTERM", polite.PID),
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Stop output does not contain %q:\n%s", want, got)
		}
	}
	// Reverse start order.
	if i, j := strings.Index(got, "dying"), strings.Index(got, "polite"); i < 0 || j < 0 || i > j {
		t.Errorf("Stop did not go in reverse start order:\n%s", got)
	}
	if serr == nil || !strings.Contains(serr.Error(), "stubborn") || errors.Is(serr, ErrNotStopped) {
		t.Errorf("Stop() = %v, want an error about stubborn that is not ErrNotStopped (it is gone)", serr)
	}
	for _, p := range []*proc{polite, stubborn, dying} {
		if done, _ := p.exited(); !done {
			t.Errorf("%s still runs after Stop", p.Name)
		}
	}
	if again := c.Stop(t.Context()); again != serr {
		t.Errorf("second Stop() = %v, want the first's result", again)
	}
}

// freeBase returns a base port whose whole range, for n regions, is free
// now. It looks in [10000, 11000): below the kernel's ephemeral range (no
// outgoing connection takes one of its ports meanwhile), below where
// tests/framework.FreePorts picks ports for other tests that may run at the
// same time, and below [11000, 20000), where tests/framework.FreeBasePort
// puts the chains of the end-to-end launcher tests in tests/: a brief listen
// here must never take a port from one of their starting components. If
// the ephemeral range reaches below 20000, the same split is made above it.
func freeBase(t *testing.T, n int) int {
	t.Helper()
	lo, hi := 10000, 11000
	if ephLo, ephHi := EphemeralPorts(); ephLo < 20000 {
		lo, hi = ephHi+1, ephHi+1001
	}
	regions := make([]string, n)
	for i := range regions {
		regions[i] = fmt.Sprintf("r%d", i)
	}
	span := lastOffset(n) + 1
	for range 200 {
		base := lo + rand.IntN(hi-lo-span)
		if checkPorts(PortPlan(base, regions)) == nil {
			return base
		}
	}
	t.Fatalf("no free range of %d ports in [%d, %d)", span, lo, hi)
	return 0
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitForLog polls path until it contains s (at most 10 s).
func waitForLog(t *testing.T, path, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %q after 10s; it holds %q", path, s, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestWatchedStep(t *testing.T) {
	var out bytes.Buffer
	steps := []step{
		{"first", func() (string, error) { return "", nil }},
		{"second", watched(&out, func(progress func(string)) (string, error) {
			progress("stage 1/2")
			progress("stage 2/2")
			return "done", nil
		})},
		{"third", func() (string, error) { return "", nil }},
	}
	if err := runSteps(&out, steps); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	want := []string{"[1/3] first ... ok (", "[2/3] second ... ", progressIndent + " +0.0s  stage 1/2", progressIndent + " +0.0s  stage 2/2",
		progressIndent + "ok (", "[3/3] third ... ok ("}
	if len(lines) != len(want) {
		t.Fatalf("runSteps output:\n%s\nwant %d lines", out.String(), len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d = %q, want it to start with %q", i+1, lines[i], w)
		}
	}
	if !strings.HasSuffix(lines[4], "s): done") {
		t.Errorf("line 5 = %q, want the outcome with its detail", lines[4])
	}
}

func TestRolloutProgress(t *testing.T) {
	for _, tc := range []struct {
		line, want string
		ok         bool
	}{
		{"2026-01-02T15:04:05Z  stage 1/3 canary: us-east [127.0.0.1:7131]", "stage 1/3 canary: us-east [127.0.0.1:7131]", true},
		{"2026-01-02T15:04:07Z  stage 1/3 canary passed its gates", "stage 1/3 canary passed its gates", true},
		{"2026-01-02T15:04:07Z  HALTED: stage 1/3 canary failed its gates: error rate rose", "HALTED: stage 1/3 canary failed its gates: error rate rose", true},
		{"2026-01-02T15:04:09Z  rollout x completed: every stage passed", "rollout x completed: every stage passed", true},
		{"2026-01-02T15:04:05Z  rollout x by spiffe://cairn.local/regionctl/global/regionctl started: why", "", false},
		{"2026-01-02T15:04:05Z  stage 1/3 canary: dry run passed on all 1 server(s)", "", false},
		{"2026-01-02T15:04:05Z  stage 1/3 canary: applying to 1 server(s)", "", false},
		{"2026-01-02T15:04:05Z  stage 1/3 canary: applied on all 1 server(s); baking until 2026-01-02T15:04:07Z", "", false},
		{"2026-01-02T15:04:07Z  stage 1/3 canary: baked; evaluating the gates", "", false},
		{"rollout x stored (epoch 1, owner o)", "", false},
		{"  stage 1/3 canary: us-east [127.0.0.1:7131]; bake 2s", "", false},
		{"", "", false},
	} {
		if got, ok := rolloutProgress(tc.line); got != tc.want || ok != tc.ok {
			t.Errorf("rolloutProgress(%q) = %q, %v, want %q, %v", tc.line, got, ok, tc.want, tc.ok)
		}
	}
}

func TestLineWriter(t *testing.T) {
	var got []string
	w := &lineWriter{fn: func(l string) { got = append(got, l) }}
	for _, p := range []string{"a", "b\nc", "\n\nd\ne", "f"} {
		if n, err := w.Write([]byte(p)); n != len(p) || err != nil {
			t.Fatalf("Write(%q) = %d, %v, want %d, nil", p, n, err, len(p))
		}
	}
	w.flush()
	if want := []string{"ab", "c", "", "d", "ef"}; !slices.Equal(got, want) {
		t.Errorf("lines = %q, want %q", got, want)
	}
	if _, err := (&lineWriter{}).Write([]byte("x\n")); err != nil {
		t.Errorf("Write on a lineWriter without fn = %v, want nil", err)
	}
}
