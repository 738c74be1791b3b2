package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/loadgen"
	"github.com/cairnkms/cairn/kmsclient"
	"github.com/cairnkms/cairn/tests/framework"
)

// What `cairn up` makes, as its tests rely on it.
const (
	// upSafes is the number of file safes (a 2-of-3 genesis).
	upSafes = 3
	// upBlobsURI and upNotesURI are the demo team's keysets in us-east,
	// both open to every region's demo client.
	upBlobsURI = "cairn-kms://us-east/demo/blobs"
	upNotesURI = "cairn-kms://us-east/demo/notes"
	// upClientRegion is the region whose demo client the tests call as.
	upClientRegion = "us-east"
)

// Bounds of the client test.
const (
	// upCallTimeout bounds one client call (retries included) outside the
	// timed parts.
	upCallTimeout = 20 * time.Second
	// upCallers loop envelope round trips while us-east/kms-1 is killed:
	// upBeforeKill round trips in all before the kill, then until
	// upAfterKill round trips that started after it have succeeded, each
	// caller at most upMaxPerCaller, all within upLoopDeadline.
	upCallers      = 4
	upBeforeKill   = 40
	upAfterKill    = 100
	upMaxPerCaller = 1000
	upLoopDeadline = 60 * time.Second
	// upDownTimeout is the client's WithTimeout with a whole region down;
	// upDownSlack is what the call may take beyond it (scheduling on 2
	// busy cores).
	upDownTimeout = 3 * time.Second
	upDownSlack   = 2 * time.Second
)

// TestUpFirstRunRerunAndTakenPort runs the real launcher (`cairn up`, with
// the binaries TestMain built) three times. On an empty state dir with file
// safes it makes the whole chain, runs the demo through the Tink client,
// writes chain.json, and stops every component on SIGTERM, exiting 0. On the
// same state dir it reuses everything (a dev unseal ceremony, no genesis)
// and is ready again; killed with -9, it takes its components with it. With
// one of its ports taken it exits 1 naming the port and the fix, having
// started and written nothing. No file and no output but the passphrase
// files holds a file safe's passphrase.
func TestUpFirstRunRerunAndTakenPort(t *testing.T) {
	regions := chain.DefaultRegions
	base := framework.FreeBasePort(t, regions)
	plan := chain.PortPlan(base, regions)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	logs := filepath.Join(dir, "launchers")

	// First run.
	l1 := framework.StartLauncher(t, bin, "cairn-up-first", logs, state, "--base-port", strconv.Itoa(base), "--safes", "file")
	took := l1.WaitReady()
	t.Logf("first run: ready in %s", took.Round(100*time.Millisecond))
	out := l1.Stdout()
	kms1 := framework.PlanAddr(t, plan, "us-east/kms-1", "gRPC").Addr()
	kms2 := framework.PlanAddr(t, plan, "us-east/kms-2", "gRPC").Addr()
	for _, want := range []string{"new chain in", fmt.Sprintf("genesis: 2-of-%d into %d insecure file safes", upSafes, upSafes), "distributor-2 by peer:",
		"rollout: bundle serial 1, canary us-east/kms-1", "    +", "stage 1/3 canary", "rollout cairn-up-first-bundles completed;",
		"demo: Tink envelope encryption", "through " + kms1 + "; decrypted through " + kms2 + ": matched", "decrypted in eu-west as", "chain.json"} {
		if !strings.Contains(out, want) {
			t.Errorf("first run output does not contain %q:\n%s", want, out)
		}
	}
	info := l1.Info()
	checkUpInfo(t, info, plan)
	framework.RequireComponentsRunning(t, info.Components)
	l1.Send(syscall.SIGTERM)
	if code := l1.ExitCode(); code != 0 {
		t.Fatalf("first run: exit %d after SIGTERM, want 0\nstdout:\n%s\nstderr:\n%s", code, l1.Stdout(), l1.Stderr())
	}
	out = l1.Stdout()
	for _, c := range info.Components {
		if want := fmt.Sprintf("stopped %s (pid %d): exit 0", c.Name, c.PID); !strings.Contains(out, want) {
			t.Errorf("first run output after SIGTERM does not contain %q:\n%s", want, out)
		}
	}
	if !strings.HasSuffix(out, "cairn up: stopped\n") {
		t.Errorf("first run output does not end with \"cairn up: stopped\":\n%s", out)
	}
	framework.RequireComponentsGone(t, info.Components, 0) // reaped by the launcher before it exited
	if after, err := chain.Load(state); err != nil || after.StoppedAt.IsZero() {
		t.Errorf("chain.Load(%s) after the stop = %v, %v; want StoppedAt set", state, after, err)
	}

	// Re-run on the same state dir: no --base-port, no --safes; all from
	// the state dir.
	l2 := framework.StartLauncher(t, bin, "cairn-up-rerun", logs, state)
	took = l2.WaitReady()
	t.Logf("re-run: ready in %s", took.Round(100*time.Millisecond))
	out = l2.Stdout()
	for _, want := range []string{"re-run of the chain in", "(0 issued, 18 kept)", "unseal ceremony: officers 1 and 2", "distributor-1 unsealed; distributor-2 by peer:",
		"3 voters restart from their Raft data", "SERVING serial 1, 2 keysets", ": matched"} {
		if !strings.Contains(out, want) {
			t.Errorf("re-run output does not contain %q:\n%s", want, out)
		}
	}
	for _, notWant := range []string{"genesis:", "keysets:", "bundles:"} {
		if strings.Contains(out, notWant) {
			t.Errorf("re-run output contains %q (nothing is made again):\n%s", notWant, out)
		}
	}
	info = l2.Info()
	checkUpInfo(t, info, plan)
	framework.RequireComponentsRunning(t, info.Components)
	// `make up` again while it runs: the hint says it runs, and how to
	// stop it; nothing else happens.
	twice := framework.StartLauncher(t, bin, "cairn-up-twice", logs, state)
	if code := twice.ExitCode(); code != 1 {
		t.Errorf("a second cairn up on the running chain's state dir: exit %d, want 1", code)
	}
	if want := fmt.Sprintf("is already running (cairn up, pid %d, ready since", l2.PID()); !strings.Contains(twice.Stdout()+twice.Stderr(), want) ||
		!strings.Contains(twice.Stdout()+twice.Stderr(), fmt.Sprintf("kill %d", l2.PID())) {
		t.Errorf("a second cairn up on the running chain's state dir does not say %q and how to stop it:\n%s%s", want, twice.Stdout(), twice.Stderr())
	}
	if after := l2.Info(); !slices.Equal(after.Components, info.Components) {
		t.Errorf("chain.json changed after the refused second cairn up: %+v, was %+v", after.Components, info.Components)
	}
	framework.RequireComponentsRunning(t, info.Components)
	// kill -9 of the launcher: the kernel ends its components.
	l2.Send(syscall.SIGKILL)
	if code := l2.ExitCode(); code != -1 {
		t.Errorf("re-run: exit %d after SIGKILL, want -1 (killed)", code)
	}
	framework.RequireComponentsGone(t, info.Components, framework.ComponentsGoneTimeout)

	// A taken port: nothing starts, nothing is written.
	taken := framework.PlanAddr(t, plan, "rootkms-2", "gRPC")
	// The killed components are gone, but the kernel may still be closing
	// their connections (an orphaned FIN_WAIT socket holds a port for a
	// moment): wait until every port of the plan can be bound again, or
	// the preflight below finds more ports taken than the one taken on
	// purpose; then take that one.
	deadline := time.Now().Add(20 * time.Second)
	for _, p := range plan {
		for {
			l, err := net.Listen("tcp", p.Addr())
			if err == nil {
				l.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("port %d (%s %s) still taken after the killed chain: %v", p.Port, p.Component, p.Purpose, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	lis, err := net.Listen("tcp", taken.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	fresh := filepath.Join(dir, "fresh")
	l3 := framework.StartLauncher(t, bin, "cairn-up-taken", logs, fresh, "--base-port", strconv.Itoa(base), "--safes", "file")
	if code := l3.ExitCode(); code != 1 {
		t.Errorf("with port %d taken: exit %d, want 1", taken.Port, code)
	}
	all := l3.Stdout() + l3.Stderr()
	for _, want := range []string{fmt.Sprintf("port %d (rootkms-2 gRPC) on 127.0.0.1 is taken", taken.Port), "make up", "--base-port"} {
		if !strings.Contains(all, want) {
			t.Errorf("with port %d taken, the output does not contain %q:\n%s", taken.Port, want, all)
		}
	}
	for _, notWant := range []string{"[ 2/", "stopping"} {
		if strings.Contains(all, notWant) {
			t.Errorf("with port %d taken, the output contains %q (something ran):\n%s", taken.Port, notWant, all)
		}
	}
	// The base port it suggests has every port of its plan free.
	if m := regexp.MustCompile(`--base-port (\d+) \(ports \d+-\d+\)`).FindStringSubmatch(all); m == nil {
		t.Errorf("with port %d taken, the output suggests no base port it checked:\n%s", taken.Port, all)
	} else {
		suggested, _ := strconv.Atoi(m[1])
		for _, p := range chain.PortPlan(suggested, regions) {
			l, err := net.Listen("tcp", p.Addr())
			if err != nil {
				t.Errorf("suggested --base-port %d: port %d (%s %s) is not free: %v", suggested, p.Port, p.Component, p.Purpose, err)
				continue
			}
			l.Close()
		}
	}
	if _, err := os.Stat(fresh); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("with port %d taken, the state dir was created (%v), want nothing written", taken.Port, err)
	}

	requireNoPassphrases(t, state, logs)
	requireNoUpSecrets(t, state, nil, logs)
}

// checkUpInfo checks that chain.json describes the chain of plan: every
// component of the plan, the default regions with two KMS servers each and
// the demo keysets, and files that exist.
func checkUpInfo(t *testing.T, info *chain.Info, plan []chain.Port) {
	t.Helper()
	var want []string
	for _, p := range plan {
		if !slices.Contains(want, p.Component) {
			want = append(want, p.Component)
		}
	}
	var got []string
	for _, c := range info.Components {
		got = append(got, c.Name)
		if p := framework.PlanAddr(t, plan, c.Name, "gRPC"); c.Address != p.Addr() {
			t.Errorf("chain.json: %s at %s, want %s (the port plan)", c.Name, c.Address, p.Addr())
		}
	}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("chain.json components = %v, want %v", got, want)
	}
	if len(info.Regions) != 2 || info.Regions[0].Name != "us-east" || len(info.Regions[0].KMS) != 2 ||
		!slices.Equal(info.Regions[0].Keysets, []string{upNotesURI, upBlobsURI}) {
		t.Errorf("chain.json regions = %+v, want us-east (2 KMS servers, %s and %s) and eu-west", info.Regions, upNotesURI, upBlobsURI)
	}
	for _, p := range []string{info.CA, info.Manifest, info.BundleSigningPub, info.Regions[0].Client.Cert, info.Regions[0].Client.Key, info.Regionctl.SigningKey} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("chain.json names %s: %v", p, err)
		}
	}
}

// requireNoPassphrases checks that the file safes' passphrase files are
// mode 0600 and hold long random passphrases, and that no other file of the
// state dir, and nothing under the other roots (the launchers' output),
// holds one in any encoding framework.Scan knows.
func requireNoPassphrases(t *testing.T, state string, roots ...string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(state, "safes", "*.passphrase"))
	if err != nil || len(files) != upSafes {
		t.Fatalf("passphrase files: %v, %v; want %d", files, err, upSafes)
	}
	var secrets []framework.Secret
	for i, f := range files {
		fi, err := os.Stat(f)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v; want mode 0600", f, fi, err)
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if s := strings.TrimSpace(string(b)); len(s) < 32 {
			t.Errorf("%s holds a %d-character passphrase, want a long random one", f, len(s))
		} else {
			secrets = append(secrets, framework.Secret{Name: fmt.Sprintf("passphrase of safe-%d", i+1), Value: []byte(s)})
		}
	}
	err = filepath.WalkDir(state, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(path, ".passphrase") {
			return err
		}
		roots = append(roots, path)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	found, stats, err := framework.Scan(roots, secrets)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Errorf("passphrase scan: %s", f)
	}
	t.Logf("scanned %d files (%d KiB) for %d passphrases", stats.Files, stats.Bytes/1024, len(secrets))
}

// TestUpClientsAgainstChain is issue 6's done-when for the client, against
// the chain the real launcher starts (`cairn up --safes file`, demo on),
// configured from its chain.json: Tink envelope encryption with every DEK
// type Tink allows in an envelope, encrypted keysets, refusal of bad
// ciphertexts, `cairn kms` and examples/blobstore as processes, failover
// with no error surfaced when the us-east KMS server serving the load is
// killed, the
// errors and the decrypt fallback with the whole region down, the
// launcher's exit, and no plaintext or DEK in any file or output.
func TestUpClientsAgainstChain(t *testing.T) {
	testStart := time.Now()
	regions := chain.DefaultRegions
	base := framework.FreeBasePort(t, regions)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	logs := filepath.Join(dir, "logs")       // the launcher's and the commands' output
	store := filepath.Join(dir, "blobstore") // the blobstore's objects
	written := filepath.Join(dir, "keysets") // encrypted keysets as written
	// Files and output that hold plaintext on purpose (the blobstore's
	// input and output, what `cairn kms decrypt` prints): not scanned.
	cleartext := t.TempDir()
	if err := os.MkdirAll(written, 0o700); err != nil {
		t.Fatal(err)
	}

	l := framework.StartLauncher(t, bin, "cairn-up", logs, state, "--base-port", strconv.Itoa(base), "--safes", "file")
	ready := l.WaitReady()
	t.Logf("chain ready (first run, file safes, demo) in %s", ready.Round(100*time.Millisecond))
	info := l.Info()
	east := upRegion(t, info, upClientRegion)
	kms1 := framework.Component(t, info, "us-east/kms-1")
	kms2 := framework.Component(t, info, "us-east/kms-2")
	if !slices.Equal(east.KMS, []string{kms1.Address, kms2.Address}) {
		t.Fatalf("chain.json: us-east endpoints %v, want kms-1 then kms-2 (%s, %s)", east.KMS, kms1.Address, kms2.Address)
	}

	// Everything secret the test makes or sees: the scan at the end looks
	// for each in every file the chain and the commands wrote.
	var secrets []framework.Secret
	addSecret := func(name string, v []byte) {
		secrets = append(secrets, framework.Secret{Name: name, Value: bytes.Clone(v)})
	}
	defer func() {
		for _, s := range secrets {
			clear(s.Value)
		}
	}()

	// Ciphertexts made now in us-east, decrypted when the region is down.
	early := upClient(t, info)
	earlyKEK := upKEK(t, early, upBlobsURI)
	earlyPlain, earlyAD := randBytes(t, 300), []byte("made while us-east serves")
	addSecret("early plaintext", earlyPlain)
	earlyCT := encryptOK(t, earlyKEK, earlyPlain, earlyAD)
	earlyEnv := envelopeWithContext(t, aead.AES256GCMKeyTemplate(), earlyKEK)
	earlyEnvCT := sealOK(t, earlyEnv, earlyPlain, earlyAD)
	secrets = append(secrets, envelopeDEK(t, earlyKEK, earlyEnvCT, aead.AES256GCMKeyTemplate().GetTypeUrl(), "early envelope")...)

	t.Run("envelope", func(t *testing.T) {
		// Two clients: what one encrypts, the other decrypts.
		k1 := upKEK(t, upClient(t, info), upBlobsURI)
		k2 := upKEK(t, upClient(t, info), upBlobsURI)
		for _, dek := range upDEKTemplates {
			for _, ctor := range envelopeConstructors {
				t.Run(dek.name+"/"+ctor.name, func(t *testing.T) {
					enc, err := ctor.new(dek.template, k1)
					if err != nil {
						t.Fatalf("%s(%s) = %v", ctor.name, dek.name, err)
					}
					dec, err := ctor.new(dek.template, k2)
					if err != nil {
						t.Fatalf("%s(%s) = %v", ctor.name, dek.name, err)
					}
					pt, ad := randBytes(t, 1000), []byte("envelope "+dek.name+" "+ctor.name)
					addSecret(fmt.Sprintf("envelope plaintext %s %s", dek.name, ctor.name), pt)
					ct, err := enc.seal(pt, ad)
					if err != nil {
						t.Fatalf("%s(%s).Encrypt = %v", ctor.name, dek.name, err)
					}
					if bytes.Contains(ct, pt) {
						t.Errorf("%s(%s): the ciphertext holds the plaintext", ctor.name, dek.name)
					}
					got, err := dec.open(ct, ad)
					if err != nil || !bytes.Equal(got, pt) {
						t.Errorf("%s(%s).Decrypt through a second client = %d bytes, %v; want the %d-byte plaintext", ctor.name, dek.name, len(got), err, len(pt))
					}
					secrets = append(secrets, envelopeDEK(t, k1, ct, dek.template.GetTypeUrl(), dek.name+" "+ctor.name)...)
				})
			}
		}
		// The one AEAD key type Tink has that an envelope does not take.
		if _, err := aead.NewKMSEnvelopeAEADWithContext(aead.XAES256GCM192BitNonceKeyTemplate(), k1); err == nil {
			t.Errorf("NewKMSEnvelopeAEADWithContext(XAES256GCM192BitNonce) = nil error, want unsupported DEK type")
		}
	})

	t.Run("encrypted keyset", func(t *testing.T) {
		k1 := upKEK(t, upClient(t, info), upBlobsURI)
		k2 := upKEK(t, upClient(t, info), upBlobsURI)
		h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
		if err != nil {
			t.Fatal(err)
		}
		ks := insecurecleartextkeyset.KeysetMaterial(h)
		var keyMaterial []framework.Secret
		for _, k := range ks.GetKey() {
			name := fmt.Sprintf("encrypted keyset key %d", k.GetKeyId())
			keyMaterial = append(keyMaterial, framework.Secret{Name: name + " (key data)", Value: k.GetKeyData().GetValue()})
			for _, raw := range keyValues(t, k.GetKeyData().GetTypeUrl(), k.GetKeyData().GetValue()) {
				keyMaterial = append(keyMaterial, framework.Secret{Name: name + " (AES key)", Value: raw})
			}
		}
		for _, s := range keyMaterial {
			addSecret(s.Name, s.Value)
		}
		a, err := aead.New(h)
		if err != nil {
			t.Fatal(err)
		}
		pt, ad := randBytes(t, 500), []byte("encrypted keyset payload")
		addSecret("encrypted keyset payload", pt)
		ct, err := a.Encrypt(pt, ad)
		if err != nil {
			t.Fatal(err)
		}
		kad := []byte("keyset of the e2e test")
		ctx, cancel := context.WithTimeout(t.Context(), upCallTimeout)
		defer cancel()
		for _, tc := range []struct {
			name  string
			json  bool
			write func(keyset.Writer) error
			read  func(keyset.Reader) (*keyset.Handle, error)
			// wrong reads with other associated data, nil if it has none.
			wrong func(keyset.Reader) (*keyset.Handle, error)
		}{
			{"Write", false,
				func(w keyset.Writer) error { return h.Write(w, k1) },
				func(r keyset.Reader) (*keyset.Handle, error) { return keyset.Read(r, k2) },
				nil},
			{"WriteWithAssociatedData", true,
				func(w keyset.Writer) error { return h.WriteWithAssociatedData(w, k1, kad) },
				func(r keyset.Reader) (*keyset.Handle, error) { return keyset.ReadWithAssociatedData(r, k2, kad) },
				func(r keyset.Reader) (*keyset.Handle, error) {
					return keyset.ReadWithAssociatedData(r, k2, []byte("another keyset"))
				}},
			{"WriteWithContext", false,
				func(w keyset.Writer) error { return h.WriteWithContext(ctx, w, k1, kad) },
				func(r keyset.Reader) (*keyset.Handle, error) { return keyset.ReadWithContext(ctx, r, k2, kad) },
				func(r keyset.Reader) (*keyset.Handle, error) { return keyset.ReadWithContext(ctx, r, k2, nil) }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				var buf bytes.Buffer
				var w keyset.Writer = keyset.NewBinaryWriter(&buf)
				reader := func() keyset.Reader { return keyset.NewBinaryReader(bytes.NewReader(buf.Bytes())) }
				if tc.json {
					w = keyset.NewJSONWriter(&buf)
					reader = func() keyset.Reader { return keyset.NewJSONReader(bytes.NewReader(buf.Bytes())) }
				}
				if err := tc.write(w); err != nil {
					t.Fatalf("%s = %v", tc.name, err)
				}
				if err := os.WriteFile(filepath.Join(written, tc.name), buf.Bytes(), 0o600); err != nil {
					t.Fatal(err)
				}
				for _, s := range keyMaterial {
					for _, e := range framework.Encodings(s.Value) {
						if bytes.Contains(buf.Bytes(), e.Bytes) {
							t.Errorf("%s wrote %s (%s)", tc.name, s.Name, e.Name)
						}
					}
				}
				h2, err := tc.read(reader())
				if err != nil {
					t.Fatalf("reading what %s wrote, through a second client = %v", tc.name, err)
				}
				if got, want := h2.KeysetInfo().GetPrimaryKeyId(), h.KeysetInfo().GetPrimaryKeyId(); got != want {
					t.Errorf("read keyset primary key ID = %d, want %d", got, want)
				}
				a2, err := aead.New(h2)
				if err != nil {
					t.Fatal(err)
				}
				if got, err := a2.Decrypt(ct, ad); err != nil || !bytes.Equal(got, pt) {
					t.Errorf("the read keyset's AEAD Decrypt(what the original encrypted) = %d bytes, %v; want the %d-byte plaintext", len(got), err, len(pt))
				}
				if tc.wrong != nil {
					if h3, err := tc.wrong(reader()); err == nil || h3 != nil {
						t.Errorf("reading what %s wrote with other associated data = %v, %v; want an error and no handle", tc.name, h3, err)
					}
				}
			})
		}
	})

	t.Run("bad ciphertexts", func(t *testing.T) {
		k := upKEK(t, upClient(t, info), upBlobsURI)
		pt, ad := randBytes(t, 64), []byte("bad ciphertexts")
		addSecret("bad-ciphertext plaintext", pt)
		ct := encryptOK(t, k, pt, ad)
		garbage := randBytes(t, 80)
		garbage[0] = 0xff // no TINK prefix: a named version the keyset lacks is NotFound, not this
		// The KMS answers every ciphertext that does not decrypt with one
		// code and one message: nothing to learn from why. (The client is
		// sticky, so every error names the same endpoint.)
		var firstErr string
		for _, tc := range []struct {
			name   string
			ct, ad []byte
		}{
			{"wrong associated data", ct, []byte("other")},
			{"no associated data", ct, nil},
			{"truncated by one byte", ct[:len(ct)-1], ad},
			{"only the key version prefix", ct[:5], ad},
			{"last byte flipped", flipLast(ct), ad},
			{"garbage", garbage, ad},
			{"garbage behind the key version prefix", append(bytes.Clone(ct[:5]), garbage...), ad},
		} {
			t.Run("kms/"+tc.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(t.Context(), upCallTimeout)
				defer cancel()
				got, err := k.DecryptWithContext(ctx, tc.ct, tc.ad)
				if err == nil || got != nil {
					t.Fatalf("Decrypt(%s) = %q, %v; want an error and a nil plaintext", tc.name, got, err)
				}
				if status.Code(err) != codes.InvalidArgument || !strings.HasSuffix(err.Error(), "desc = kms: ciphertext does not decrypt") {
					t.Errorf("Decrypt(%s) = %v (code %v), want InvalidArgument ending \"kms: ciphertext does not decrypt\"", tc.name, err, status.Code(err))
				}
				if firstErr == "" {
					firstErr = err.Error()
				} else if err.Error() != firstErr {
					t.Errorf("Decrypt(%s) = %q, want the same error as every other bad ciphertext, %q", tc.name, err, firstErr)
				}
			})
		}
		t.Run("kms/empty", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), upCallTimeout)
			defer cancel()
			if got, err := k.DecryptWithContext(ctx, []byte{}, ad); err == nil || got != nil || status.Code(err) != codes.InvalidArgument {
				t.Errorf("Decrypt(empty) = %q, %v; want an InvalidArgument error and a nil plaintext", got, err)
			}
		})

		// The same through Tink's envelope AEADs: the wrapped DEK or the
		// payload does not open.
		for _, ctor := range envelopeConstructors {
			env, err := ctor.new(aead.AES256GCMKeyTemplate(), k)
			if err != nil {
				t.Fatal(err)
			}
			ect, err := env.seal(pt, ad)
			if err != nil {
				t.Fatalf("%s: Encrypt = %v", ctor.name, err)
			}
			for _, tc := range []struct {
				name   string
				ct, ad []byte
			}{
				{"wrong associated data", ect, []byte("other")},
				{"truncated by one byte", ect[:len(ect)-1], ad},
				{"only the DEK", ect[:len(ect)-len(pt)], ad},
				{"last byte flipped", flipLast(ect), ad},
				{"DEK byte flipped", flipAt(ect, 10), ad},
				{"garbage", garbage, ad},
				{"three bytes", garbage[:3], ad},
				{"empty", []byte{}, ad},
			} {
				t.Run(ctor.name+"/"+tc.name, func(t *testing.T) {
					if got, err := env.open(tc.ct, tc.ad); err == nil || got != nil {
						t.Errorf("%s Decrypt(%s) = %q, %v; want an error and a nil plaintext", ctor.name, tc.name, got, err)
					}
				})
			}
		}
	})

	t.Run("cairn kms", func(t *testing.T) {
		text := "cairn kms e2e " + hex.EncodeToString(randBytes(t, 16))
		addSecret("cairn kms encrypt text", []byte(text))
		kms := func(logDir, name string, stdin []byte, args ...string) framework.Result {
			return framework.RunInput(t, name, logDir, stdin, bin.Cairn, append([]string{"kms"}, args...))
		}
		enc := kms(logs, "kms-encrypt", nil, "encrypt", "--chain", state, "--key", upNotesURI, "--ad", "invoice-7", text)
		if enc.ExitCode != 0 {
			t.Fatalf("cairn kms encrypt failed:\n%s", enc)
		}
		ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(enc.Stdout))
		if err != nil || len(ct) == 0 {
			t.Fatalf("cairn kms encrypt printed %q, want a base64 ciphertext (%v)", enc.Stdout, err)
		}
		if strings.Contains(enc.Stdout+enc.Stderr, text) {
			t.Errorf("cairn kms encrypt printed the plaintext:\n%s", enc)
		}
		dec := kms(cleartext, "kms-decrypt", []byte(enc.Stdout), "decrypt", "--chain", state, "--key", upNotesURI, "--ad", "invoice-7")
		if dec.ExitCode != 0 || dec.Stdout != text {
			t.Errorf("cairn kms encrypt | cairn kms decrypt = exit %d, stdout %q; want 0 and exactly %q\n%s", dec.ExitCode, dec.Stdout, text, dec)
		}
		wrong := kms(logs, "kms-decrypt-wrong-ad", []byte(enc.Stdout), "decrypt", "--chain", state, "--key", upNotesURI, "--ad", "invoice-8")
		if wrong.ExitCode != 1 || wrong.Stdout != "" || !strings.HasPrefix(wrong.Stderr, "cairn kms decrypt: ") ||
			!strings.Contains(wrong.Stderr, "does not decrypt") || strings.Contains(wrong.Stderr, text) {
			t.Errorf("cairn kms decrypt --ad invoice-8 (encrypted with invoice-7) = %s\nwant exit 1, nothing on stdout, a message on stderr", wrong)
		}

		st := kms(logs, "kms-status", nil, "status", "--chain", state)
		if st.ExitCode != 0 {
			t.Fatalf("cairn kms status failed:\n%s", st)
		}
		rows := statusRows(st.Stdout)
		for _, c := range info.Components {
			if c.Kind != "kms" {
				continue
			}
			if got := rows[c.Name]; len(got) < 5 || got[1] != c.Address || got[2] != "SERVING" || got[3] != "serial" || got[4] != "1" {
				t.Errorf("cairn kms status row of %s = %q, want %s SERVING serial 1\n%s", c.Name, got, c.Address, st.Stdout)
			}
		}
		// The usage table: demo/notes on us-east/kms-1 was used to
		// encrypt (by the demo and just now).
		if !strings.Contains(st.Stdout, "KEY VERSION") {
			t.Errorf("cairn kms status shows no usage table:\n%s", st.Stdout)
		}
		used := false
		for line := range strings.Lines(st.Stdout) {
			f := strings.Fields(line)
			if len(f) == 7 && f[0] == "us-east/kms-1" && f[1] == "demo/notes" && f[3] == "PRIMARY" {
				n, err := strconv.Atoi(f[4])
				used = err == nil && n >= 1
			}
		}
		if !used {
			t.Errorf("cairn kms status: no usage row of us-east/kms-1 demo/notes with at least 1 encrypt:\n%s", st.Stdout)
		}
	})

	t.Run("blobstore", func(t *testing.T) {
		var content bytes.Buffer
		for i := range 64 {
			fmt.Fprintf(&content, "line %02d of the blobstore e2e object %s\n", i, hex.EncodeToString(randBytes(t, 16)))
		}
		addSecret("blobstore object", content.Bytes())
		in, out := filepath.Join(cleartext, "report.txt"), filepath.Join(cleartext, "report.out")
		if err := os.WriteFile(in, content.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		blobstore := func(name string, args ...string) framework.Result {
			r := framework.Run(t, name, logs, bin.Blobstore, append([]string{"--chain", state, "--store", store}, args...))
			if r.ExitCode != 0 {
				t.Fatalf("blobstore failed:\n%s", r)
			}
			return r
		}
		put := blobstore("blobstore-put", "put", "report.txt", in)
		if want := fmt.Sprintf("stored report.txt: %d bytes, DEK wrapped by %s", content.Len(), upBlobsURI); !strings.Contains(put.Stdout, want) {
			t.Errorf("blobstore put printed %q, want %q", put.Stdout, want)
		}
		list := blobstore("blobstore-list", "list")
		listed := false
		for line := range strings.Lines(list.Stdout) {
			f := strings.Fields(line)
			listed = listed || len(f) == 5 && f[0] == "report.txt" && f[1] == strconv.Itoa(content.Len()) && f[3] == upBlobsURI
		}
		if !listed {
			t.Errorf("blobstore list = %q, want a row report.txt %d ... %s", list.Stdout, content.Len(), upBlobsURI)
		}
		get := blobstore("blobstore-get", "get", "report.txt", out)
		if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, content.Bytes()) {
			t.Errorf("blobstore get wrote %d bytes (%v), want the %d bytes put\n%s", len(got), err, content.Len(), get)
		}
		found, _, err := framework.Scan([]string{store}, []framework.Secret{{Name: "the object", Value: content.Bytes()}})
		if err != nil || len(found) > 0 {
			t.Errorf("the blobstore's store holds the plaintext: %v, %v", found, err)
		}
	})

	// busy is the us-east KMS server that serves the failover loop when it
	// is killed; spare is the other, which takes over and is killed next.
	var busy, spare chain.Component
	id := east.Client.SPIFFEID
	t.Run("failover", func(t *testing.T) {
		// A fresh client, which starts at a random us-east endpoint and
		// stays there while it answers.
		k := upKEK(t, upClient(t, info), upBlobsURI)
		env := envelopeWithContext(t, aead.AES256GCMKeyTemplate(), k)
		ctx, cancel := context.WithTimeout(t.Context(), upLoopDeadline)
		defer cancel()
		var (
			done, afterKill atomic.Int64
			inFlight        atomic.Int64
			killed          atomic.Bool
			mu              sync.Mutex
			errs            []error
			slowest         time.Duration
			wg              sync.WaitGroup
		)
		loopStart := time.Now()
		for i := range upCallers {
			pt := randBytes(t, 512)
			addSecret(fmt.Sprintf("failover plaintext of caller %d", i), pt)
			wg.Go(func() {
				for n := 0; n < upMaxPerCaller && ctx.Err() == nil; n++ {
					if killed.Load() && afterKill.Load() >= upAfterKill {
						return
					}
					after := killed.Load()
					ad := fmt.Appendf(nil, "failover caller %d call %d", i, n)
					t0 := time.Now()
					inFlight.Add(1)
					ct, err := env.EncryptWithContext(ctx, pt, ad)
					if err == nil {
						var got []byte
						if got, err = env.DecryptWithContext(ctx, ct, ad); err == nil && !bytes.Equal(got, pt) {
							err = errors.New("the round trip changed the plaintext")
						}
					}
					inFlight.Add(-1)
					took := time.Since(t0)
					mu.Lock()
					slowest = max(slowest, took)
					if err != nil {
						errs = append(errs, fmt.Errorf("caller %d round trip %d: %w", i, n, err))
					}
					mu.Unlock()
					if err != nil {
						continue
					}
					done.Add(1)
					if after {
						afterKill.Add(1)
					}
				}
			})
		}
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		tick := time.NewTicker(5 * time.Millisecond)
		for waiting := true; waiting && done.Load() < upBeforeKill; {
			select {
			case <-finished: // every caller gave up
				waiting = false
			case <-ctx.Done():
				waiting = false
			case <-tick.C:
			}
		}
		tick.Stop()
		before := done.Load()
		// Kill the server that served the most recent calls: the one whose
		// audit log has the loop's latest call.
		_, last1 := kmsCalls(t, kms1, id, "demo/blobs", loopStart, time.Now())
		_, last2 := kmsCalls(t, kms2, id, "demo/blobs", loopStart, time.Now())
		switch {
		case last1.IsZero() && last2.IsZero():
			t.Fatalf("failover: after %d round trips, neither us-east KMS server audited a call of the loop", before)
		case last1.After(last2):
			busy, spare = kms1, kms2
		default:
			busy, spare = kms2, kms1
		}
		killAt := time.Now()
		l.KillComponent(info, busy.Name)
		killed.Store(true)
		spanning := inFlight.Load() // round trips in flight as it died (at most upCallers)
		<-finished
		loopEnd := time.Now()
		t.Logf("failover: %d callers, %d round trips (%d before the kill of %s at %s, %d in flight when it was gone, %d started after it) in %s; slowest round trip %s",
			upCallers, done.Load(), before, busy.Name, killAt.Sub(loopStart).Round(time.Millisecond), spanning, afterKill.Load(),
			loopEnd.Sub(loopStart).Round(time.Millisecond), slowest.Round(time.Millisecond))
		for i, err := range errs {
			if i == 5 {
				t.Errorf("... and %d more errors", len(errs)-5)
				break
			}
			t.Errorf("failover: %v", err)
		}
		if before < upBeforeKill || afterKill.Load() < upAfterKill {
			t.Errorf("failover: %d round trips before the kill and %d after, want at least %d and %d within %s", before, afterKill.Load(), upBeforeKill, upAfterKill, upLoopDeadline)
		}

		// Both servers served the loop: the busy one until it died, the
		// spare every call that started after.
		nBusy, _ := kmsCalls(t, busy, id, "demo/blobs", loopStart, loopEnd)
		nSpare, _ := kmsCalls(t, spare, id, "demo/blobs", loopStart, loopEnd)
		t.Logf("failover: audited Encrypt+Decrypt calls of the loop: %s (killed) %d, %s %d", busy.Name, nBusy, spare.Name, nSpare)
		if nBusy == 0 || nSpare < 2*afterKill.Load() {
			t.Errorf("failover: audited calls %s %d, %s %d; want some on the first and at least %d on the second", busy.Name, nBusy, spare.Name, nSpare, 2*afterKill.Load())
		}

		// The launcher reports the death and keeps the rest running.
		l.WaitOutput("the launcher reporting "+busy.Name+"'s exit", func(stdout, stderr string) bool {
			return strings.Contains(stderr, fmt.Sprintf("cairn up: chain: %s: exited unexpectedly (pid %d", busy.Name, busy.PID)) &&
				strings.Contains(stdout, "cairn up: a component exited (9 still running)")
		})
		if !l.Running() {
			t.Errorf("the launcher exited after %s died, want it running", busy.Name)
		}
		framework.RequireComponentsRunning(t, others(info.Components, busy.Name))
	})
	if busy.Name == "" {
		t.FailNow() // nothing was killed: the rest assumes it was
	}

	t.Run("region down", func(t *testing.T) {
		l.KillComponent(info, spare.Name)
		l.WaitOutput("the launcher reporting "+spare.Name+"'s exit", func(stdout, stderr string) bool {
			return strings.Contains(stderr, fmt.Sprintf("cairn up: chain: %s: exited unexpectedly (pid %d", spare.Name, spare.PID)) &&
				strings.Contains(stdout, "cairn up: a component exited (8 still running)")
		})
		framework.RequireComponentsRunning(t, others(info.Components, busy.Name, spare.Name))

		// Encrypt never leaves its region: it fails, in time, saying where.
		down := upKEK(t, upClient(t, info, kmsclient.WithTimeout(upDownTimeout)), upBlobsURI)
		t0 := time.Now()
		ct, err := down.EncryptWithContext(context.Background(), randBytes(t, 32), nil)
		took := time.Since(t0)
		t.Logf("region down: Encrypt failed in %s: %v", took.Round(time.Millisecond), err)
		if code := status.Code(err); err == nil || ct != nil || (code != codes.Unavailable && code != codes.DeadlineExceeded) {
			t.Errorf("Encrypt with us-east down = %x, %v (code %v); want Unavailable or DeadlineExceeded", ct, err, status.Code(err))
		} else if !strings.Contains(err.Error(), "region us-east") {
			t.Errorf("Encrypt with us-east down: error %q does not name the region", err)
		}
		if took > upDownTimeout+upDownSlack {
			t.Errorf("Encrypt with us-east down took %s, want at most %s (WithTimeout) + %s", took, upDownTimeout, upDownSlack)
		}

		// Decrypt of what us-east made falls back to eu-west, and only with
		// WithDecryptFallback.
		if pt, err := down.DecryptWithContext(context.Background(), earlyCT, earlyAD); err == nil || pt != nil ||
			(status.Code(err) != codes.Unavailable && status.Code(err) != codes.DeadlineExceeded) {
			t.Errorf("Decrypt with us-east down, no fallback = %d bytes, %v; want Unavailable or DeadlineExceeded and no plaintext", len(pt), err)
		}
		fb := upKEK(t, upClient(t, info, kmsclient.WithTimeout(upDownTimeout), kmsclient.WithDecryptFallback("us-east", "eu-west")), upBlobsURI)
		t0 = time.Now()
		if pt, err := fb.DecryptWithContext(context.Background(), earlyCT, earlyAD); err != nil || !bytes.Equal(pt, earlyPlain) {
			t.Errorf("Decrypt with us-east down, falling back to eu-west = %d bytes, %v; want the %d-byte plaintext", len(pt), err, len(earlyPlain))
		}
		t.Logf("region down: Decrypt through the eu-west fallback in %s", time.Since(t0).Round(time.Millisecond))
		env := envelopeWithContext(t, aead.AES256GCMKeyTemplate(), fb)
		if pt, err := env.DecryptWithContext(t.Context(), earlyEnvCT, earlyAD); err != nil || !bytes.Equal(pt, earlyPlain) {
			t.Errorf("envelope Decrypt with us-east down, falling back to eu-west = %d bytes, %v; want the %d-byte plaintext", len(pt), err, len(earlyPlain))
		}

		st := framework.Run(t, "kms-status-region-down", logs, bin.Cairn, []string{"kms", "status", "--chain", state})
		rows := statusRows(st.Stdout)
		if st.ExitCode != 1 || !strings.Contains(st.Stderr, "2 KMS servers unreachable") {
			t.Errorf("cairn kms status with us-east down = %s\nwant exit 1 and \"2 KMS servers unreachable\"", st)
		}
		for _, c := range info.Components {
			if c.Kind != "kms" {
				continue
			}
			want := "SERVING"
			if c.Region == "us-east" {
				want = "UNREACHABLE"
			}
			if got := rows[c.Name]; len(got) < 3 || got[1] != c.Address || got[2] != want {
				t.Errorf("cairn kms status row of %s = %q, want %s %s\n%s", c.Name, got, c.Address, want, st.Stdout)
			}
		}
	})

	// Stopped with SIGTERM after components died, the launcher stops the
	// rest and exits 1 (cmd/cairn/up.go: a death is an error of the run).
	stopStart := time.Now()
	l.Send(syscall.SIGTERM)
	if code := l.ExitCode(); code != 1 {
		t.Errorf("cairn up: exit %d after SIGTERM with two components dead, want 1\nstdout:\n%s\nstderr:\n%s", code, l.Stdout(), l.Stderr())
	}
	t.Logf("launcher stopped in %s", time.Since(stopStart).Round(time.Millisecond))
	out := l.Stdout()
	for _, c := range info.Components {
		want := fmt.Sprintf("stopped %s (pid %d): exit 0", c.Name, c.PID)
		if c.Name == busy.Name || c.Name == spare.Name {
			want = fmt.Sprintf("%s (pid %d) had already exited: killed by SIGKILL", c.Name, c.PID)
		}
		if !strings.Contains(out, want) {
			t.Errorf("launcher output after SIGTERM does not contain %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "cairn up: stopping everything") || strings.Contains(out, "cairn up: stopped") {
		t.Errorf("launcher output after SIGTERM: want \"cairn up: stopping everything\" and not \"cairn up: stopped\" (it failed):\n%s", out)
	}
	framework.RequireComponentsGone(t, info.Components, 0)
	if after, err := chain.Load(state); err != nil || after.StoppedAt.IsZero() {
		t.Errorf("chain.Load(%s) after the stop = %v, %v; want StoppedAt set", state, after, err)
	}

	// No plaintext, DEK or key of the test, and no root key, share or
	// passphrase of the chain, in any file the chain, the launcher, the
	// commands and the blobstore wrote.
	requireNoUpSecrets(t, state, secrets, logs, store, written)
	t.Logf("whole test %s", time.Since(testStart).Round(100*time.Millisecond))
}

// upRegion returns the region of chain.json named name.
func upRegion(t testing.TB, info *chain.Info, name string) chain.Region {
	t.Helper()
	r, ok := info.Region(name)
	if !ok {
		t.Fatalf("chain.json has no region %s", name)
	}
	return r
}

// upClient returns a kmsclient.Client for the chain of info: the KMS
// endpoints of every region, called as us-east's demo client. It is closed
// when the test ends.
func upClient(t testing.TB, info *chain.Info, opts ...kmsclient.Option) *kmsclient.Client {
	t.Helper()
	id := upRegion(t, info, upClientRegion).Client
	all := []kmsclient.Option{kmsclient.WithIdentityFiles(id.Cert, id.Key, id.CA)}
	for _, r := range info.Regions {
		all = append(all, kmsclient.WithEndpoints(r.Name, r.KMS...))
	}
	c, err := kmsclient.New(append(all, opts...)...)
	if err != nil {
		t.Fatalf("kmsclient.New = %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// upKEK returns the client's AEAD of a key URI.
func upKEK(t testing.TB, c *kmsclient.Client, uri string) *kmsclient.AEAD {
	t.Helper()
	a, err := c.GetAEAD(uri)
	if err != nil {
		t.Fatalf("GetAEAD(%s) = %v", uri, err)
	}
	k, ok := a.(*kmsclient.AEAD)
	if !ok {
		t.Fatalf("GetAEAD(%s) = %T, want *kmsclient.AEAD", uri, a)
	}
	return k
}

// upDEKTemplates are the DEK types Tink lets an envelope use (AES-GCM,
// AES-GCM-SIV, ChaCha20-Poly1305, XChaCha20-Poly1305, AES-CTR-HMAC).
var upDEKTemplates = []struct {
	name     string
	template *tinkpb.KeyTemplate
}{
	{"AES128_GCM", aead.AES128GCMKeyTemplate()},
	{"AES256_GCM", aead.AES256GCMKeyTemplate()},
	{"AES256_GCM_SIV", aead.AES256GCMSIVKeyTemplate()},
	{"CHACHA20_POLY1305", aead.ChaCha20Poly1305KeyTemplate()},
	{"XCHACHA20_POLY1305", aead.XChaCha20Poly1305KeyTemplate()},
	{"AES128_CTR_HMAC_SHA256", aead.AES128CTRHMACSHA256KeyTemplate()},
	{"AES256_CTR_HMAC_SHA256", aead.AES256CTRHMACSHA256KeyTemplate()},
}

// sealer is one of Tink's envelope AEADs as two functions.
type sealer struct {
	seal func(pt, ad []byte) ([]byte, error)
	open func(ct, ad []byte) ([]byte, error)
}

// envelopeConstructors make Tink's two envelope AEADs over a Cairn AEAD.
var envelopeConstructors = []struct {
	name string
	new  func(dek *tinkpb.KeyTemplate, kek *kmsclient.AEAD) (sealer, error)
}{
	{"NewKMSEnvelopeAEAD2", func(dek *tinkpb.KeyTemplate, kek *kmsclient.AEAD) (sealer, error) {
		e := aead.NewKMSEnvelopeAEAD2(dek, kek)
		return sealer{e.Encrypt, e.Decrypt}, nil
	}},
	{"NewKMSEnvelopeAEADWithContext", func(dek *tinkpb.KeyTemplate, kek *kmsclient.AEAD) (sealer, error) {
		e, err := aead.NewKMSEnvelopeAEADWithContext(dek, kek)
		if err != nil {
			return sealer{}, err
		}
		return sealer{
			func(pt, ad []byte) ([]byte, error) {
				ctx, cancel := context.WithTimeout(context.Background(), upCallTimeout)
				defer cancel()
				return e.EncryptWithContext(ctx, pt, ad)
			},
			func(ct, ad []byte) ([]byte, error) {
				ctx, cancel := context.WithTimeout(context.Background(), upCallTimeout)
				defer cancel()
				return e.DecryptWithContext(ctx, ct, ad)
			},
		}, nil
	}},
}

func envelopeWithContext(t testing.TB, dek *tinkpb.KeyTemplate, kek *kmsclient.AEAD) *aead.KMSEnvelopeAEADWithContext {
	t.Helper()
	e, err := aead.NewKMSEnvelopeAEADWithContext(dek, kek)
	if err != nil {
		t.Fatalf("NewKMSEnvelopeAEADWithContext = %v", err)
	}
	return e
}

func encryptOK(t testing.TB, k *kmsclient.AEAD, pt, ad []byte) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), upCallTimeout)
	defer cancel()
	ct, err := k.EncryptWithContext(ctx, pt, ad)
	if err != nil {
		t.Fatalf("Encrypt with %s/%s = %v", k.Region(), k.Keyset(), err)
	}
	return ct
}

func sealOK(t testing.TB, e *aead.KMSEnvelopeAEADWithContext, pt, ad []byte) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), upCallTimeout)
	defer cancel()
	ct, err := e.EncryptWithContext(ctx, pt, ad)
	if err != nil {
		t.Fatalf("envelope Encrypt = %v", err)
	}
	return ct
}

// envelopeDEK unwraps the DEK of a Tink envelope ciphertext (a 4-byte
// big-endian length, the wrapped DEK, the payload) with kek, as the envelope
// AEAD does (empty associated data), and returns the serialized DEK, a key
// of type typeURL, and the raw key bytes in it, for the secret scan.
func envelopeDEK(t testing.TB, kek *kmsclient.AEAD, ct []byte, typeURL, label string) []framework.Secret {
	t.Helper()
	if len(ct) < 4 {
		t.Fatalf("%s: %d-byte envelope ciphertext", label, len(ct))
	}
	n := binary.BigEndian.Uint32(ct)
	if uint64(n) > uint64(len(ct)-4) {
		t.Fatalf("%s: envelope names a %d-byte wrapped DEK in %d bytes", label, n, len(ct))
	}
	ctx, cancel := context.WithTimeout(context.Background(), upCallTimeout)
	defer cancel()
	dek, err := kek.DecryptWithContext(ctx, ct[4:4+n], nil)
	if err != nil {
		t.Fatalf("%s: unwrapping the DEK = %v", label, err)
	}
	out := []framework.Secret{{Name: label + " DEK (serialized)", Value: dek}}
	for i, raw := range keyValues(t, typeURL, dek) {
		out = append(out, framework.Secret{Name: fmt.Sprintf("%s DEK key %d", label, i), Value: raw})
	}
	return out
}

// keyValues returns every key_value field (the raw key bytes) of a
// serialized Tink key of type typeURL, nested messages included (AES-CTR-HMAC
// has two keys). It fails the test if there is none.
func keyValues(t testing.TB, typeURL string, serialized []byte) [][]byte {
	t.Helper()
	m, err := unmarshalKey(typeURL, serialized)
	if err != nil {
		t.Fatalf("key of type %s: %v", typeURL, err)
	}
	var out [][]byte
	var walk func(protoreflect.Message)
	walk = func(m protoreflect.Message) {
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			switch {
			case fd.Kind() == protoreflect.BytesKind && fd.Name() == "key_value":
				out = append(out, bytes.Clone(v.Bytes()))
			case fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap():
				walk(v.Message())
			}
			return true
		})
	}
	walk(m.ProtoReflect())
	if len(out) == 0 {
		t.Fatalf("key of type %s holds no key_value", typeURL)
	}
	return out
}

// unmarshalKey parses a serialized Tink key of type typeURL.
func unmarshalKey(typeURL string, serialized []byte) (proto.Message, error) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(typeURL)
	if err != nil {
		return nil, err
	}
	m := mt.New().Interface()
	if err := proto.Unmarshal(serialized, m); err != nil {
		return nil, err
	}
	return m, nil
}

// kmsCalls counts the Encrypt and Decrypt calls of identity on keyset that a
// KMS server audited as ok between from and to, and returns the time of the
// last. A server killed with -9 may have left an incomplete last line, which
// is not counted.
func kmsCalls(t testing.TB, c chain.Component, identity, keyset string, from, to time.Time) (n int64, last time.Time) {
	t.Helper()
	path := filepath.Join(c.StateDir, "audit.log")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%s: %v", c.Name, err)
	}
	lines := bytes.Split(data, []byte("\n"))
	for i, line := range lines[:len(lines)-1] { // the last is "" or incomplete
		var r audit.Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("%s line %d: %v", path, i+1, err)
		}
		op := r.Operation[strings.LastIndexByte(r.Operation, '/')+1:]
		if r.Identity == identity && r.Target.Keyset == keyset && r.Outcome == audit.OutcomeOK &&
			(op == "Encrypt" || op == "Decrypt") && !r.Time.Before(from) && !r.Time.After(to) {
			n++
			last = r.Time
		}
	}
	return n, last
}

// statusRows parses the server table of `cairn kms status`: the fields of
// each row by server name.
func statusRows(out string) map[string][]string {
	rows := map[string][]string{}
	for line := range strings.Lines(out) {
		if line == "\n" {
			break // the usage table follows
		}
		if f := strings.Fields(line); len(f) > 0 && f[0] != "SERVER" {
			rows[f[0]] = f
		}
	}
	return rows
}

// others returns the components not named in names.
func others(cs []chain.Component, names ...string) []chain.Component {
	var out []chain.Component
	for _, c := range cs {
		if !slices.Contains(names, c.Name) {
			out = append(out, c)
		}
	}
	return out
}

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// flipLast returns a copy of b with its last byte changed.
func flipLast(b []byte) []byte { return flipAt(b, len(b)-1) }

// flipAt returns a copy of b with byte i changed.
func flipAt(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x01
	return c
}

// BenchmarkUpEnvelope is the client's view of the real chain: `cairn up
// --no-demo --safes file` is started once (and stopped with SIGTERM at
// cleanup), then each op is one 1 KiB object's round trip through Tink's
// envelope AEAD (aead.NewKMSEnvelopeAEADWithContext, AES256_GCM DEKs) with
// the kmsclient AEAD of cairn-kms://us-east/demo/blobs: an encrypt (a new
// DEK, one KMS Encrypt on us-east/kms-1 over mTLS on 127.0.0.1) and its
// decrypt (one KMS Decrypt), with exactly 1 or 16 concurrent callers sharing
// one client. Every round trip's plaintext is checked. It reports objects/s
// and the p50 and p99 latency of one round trip. Unlike kmsclient's
// BenchmarkEnvelope, the servers are separate processes (the KMS's own work
// is not in allocs/op) and write their audit logs as `cairn up` runs them.
func BenchmarkUpEnvelope(b *testing.B) {
	regions := chain.DefaultRegions
	dir := b.TempDir()
	l := framework.StartLauncher(b, bin, "cairn-up", filepath.Join(dir, "logs"), filepath.Join(dir, "state"),
		"--base-port", strconv.Itoa(framework.FreeBasePort(b, regions)), "--no-demo", "--safes", "file")
	ready := l.WaitReady()
	b.Logf("chain ready in %s", ready.Round(100*time.Millisecond))
	b.Cleanup(func() {
		l.Send(syscall.SIGTERM)
		if code := l.ExitCode(); code != 0 {
			b.Errorf("cairn up: exit %d after SIGTERM, want 0\nstderr:\n%s", code, l.Stderr())
		}
	})
	info := l.Info()
	kek := upKEK(b, upClient(b, info), upBlobsURI)
	env := envelopeWithContext(b, aead.AES256GCMKeyTemplate(), kek)
	// Connect before timing.
	warm := randBytes(b, 1024)
	if pt, err := env.DecryptWithContext(b.Context(), sealOK(b, env, warm, nil), nil); err != nil || !bytes.Equal(pt, warm) {
		b.Fatalf("warm-up round trip = %d bytes, %v", len(pt), err)
	}

	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(b.Context(), upBenchDeadline)
			defer cancel()
			calls := make([]loadgen.Call, callers)
			for i := range calls {
				calls[i] = envelopeRoundTrip(b, env, 1024)
			}
			b.ResetTimer()
			r, err := loadgen.Run(ctx, b.N, calls, true)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			r.Report(b, "objects/s")
		})
	}
}

// upBenchDeadline bounds every call of one sub-benchmark run.
const upBenchDeadline = 2 * time.Minute
