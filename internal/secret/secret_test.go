package secret_test

import (
	"bytes"
	"encoding/base64"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/cairnkms/cairn/internal/secret"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Two recognisable keys: one of non-printable bytes and one of printable
// ASCII, so that both escaped and raw renderings are looked for.
var (
	keyA5    = bytes.Repeat([]byte{0xA5}, 32)
	keyASCII = []byte("KEYMATERIAL-0123456789abcdef-XYZ")
	testKeys = [][]byte{keyA5, keyASCII}
)

// leakForms returns the renderings of key that must never appear in output:
// raw, hex (lower, upper, spaced, Go literal), base64 (standard and URL),
// Go-quoted, and decimal byte lists. They are built from a 12-byte prefix so
// that partial leaks are caught too (12 is a multiple of 3, so the base64 of
// the prefix is a prefix of the base64 of the key).
func leakForms(key []byte) []string {
	w := key[:12]
	dec := make([]string, len(w))
	lit := make([]string, len(w))
	for i, c := range w {
		dec[i] = strconv.Itoa(int(c))
		lit[i] = fmt.Sprintf("0x%02x", c)
	}
	quoted := strconv.Quote(string(w))
	return []string{
		string(w),
		hex.EncodeToString(w),
		strings.ToUpper(hex.EncodeToString(w)),
		fmt.Sprintf("% x", w),
		fmt.Sprintf("% X", w),
		strings.Join(lit, ", "),
		base64.StdEncoding.EncodeToString(w),
		base64.URLEncoding.EncodeToString(w),
		quoted[1 : len(quoted)-1],
		strings.Join(dec, " "),
		strings.Join(dec, ","),
		strings.Join(dec, ", "),
	}
}

// checkNoLeak fails the test if out contains any rendering of key.
func checkNoLeak(t *testing.T, what, out string, key []byte) {
	t.Helper()
	for _, form := range leakForms(key) {
		if strings.Contains(out, form) {
			t.Errorf("%s = %q, which contains key rendering %q", what, out, form)
		}
	}
}

// verbs covers every fmt verb family plus flags, widths and precisions.
var verbs = []string{
	"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "% x", "%#x", "% X",
	"%d", "%b", "%o", "%O", "%c", "%U", "%e", "%f", "%g", "%t",
	"%10v", "%-40s", "%.3s", "%08x", "%+q", "%#q", "%T", "%p",
}

type exported struct {
	Name string
	Key  secret.Bytes
}

type unexported struct {
	name string
	key  secret.Bytes
}

type nested struct {
	Inner  *unexported
	inner  unexported
	List   []secret.Bytes
	byName map[string]secret.Bytes
	anyv   any
}

// holders returns the key held in every shape the fmt tests print.
func holders(k secret.Bytes) []struct {
	name string
	v    any
} {
	u := unexported{name: "u", key: k}
	return []struct {
		name string
		v    any
	}{
		{"value", k},
		{"pointer", &k},
		{"exported field", exported{Name: "e", Key: k}},
		{"pointer to exported field", &exported{Name: "e", Key: k}},
		{"unexported field", u},
		{"pointer to unexported field", &u},
		{"slice", []secret.Bytes{k, k}},
		{"array", [2]secret.Bytes{k, k}},
		{"map value", map[string]secret.Bytes{"k": k}},
		{"slice of any", []any{k, &k}},
		{"nested", nested{
			Inner:  &u,
			inner:  u,
			List:   []secret.Bytes{k},
			byName: map[string]secret.Bytes{"k": k},
			anyv:   k,
		}},
		{"pointer to nested", &nested{Inner: &u, inner: u, anyv: &k}},
	}
}

func TestFormatDoesNotLeak(t *testing.T) {
	for _, key := range testKeys {
		k := secret.New(key)
		for _, h := range holders(k) {
			for _, verb := range verbs {
				t.Run(fmt.Sprintf("%s/%s/%x", h.name, verb, key[:2]), func(t *testing.T) {
					out := fmt.Sprintf(verb, h.v)
					checkNoLeak(t, fmt.Sprintf("fmt.Sprintf(%q, %s)", verb, h.name), out, key)
				})
			}
		}
		for _, h := range holders(k) {
			t.Run(fmt.Sprintf("%s/Sprint/%x", h.name, key[:2]), func(t *testing.T) {
				checkNoLeak(t, "fmt.Sprint("+h.name+")", fmt.Sprint(h.v), key)
				checkNoLeak(t, "fmt.Sprintln("+h.name+")", fmt.Sprintln(h.v), key)
				checkNoLeak(t, "fmt.Errorf(%v)", fmt.Errorf("wrapped %v", h.v).Error(), key)
			})
		}
	}
}

func TestFormatExact(t *testing.T) {
	k := secret.New(keyASCII)
	var zero secret.Bytes
	for _, verb := range verbs {
		if verb == "%T" || verb == "%p" {
			continue // type name and address; covered by TestFormatDoesNotLeak
		}
		for _, tc := range []struct {
			name string
			v    any
		}{{"value", k}, {"pointer", &k}, {"zero", zero}} {
			t.Run(tc.name+"/"+verb, func(t *testing.T) {
				if got := fmt.Sprintf(verb, tc.v); got != secret.Redacted {
					t.Errorf("fmt.Sprintf(%q, %s) = %q, want %q", verb, tc.name, got, secret.Redacted)
				}
			})
		}
	}
	for _, tc := range []struct {
		name string
		got  string
	}{
		{"String()", k.String()},
		{"GoString()", k.GoString()},
		{"LogValue().String()", k.LogValue().String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != secret.Redacted {
				t.Errorf("%s = %q, want %q", tc.name, tc.got, secret.Redacted)
			}
		})
	}
}

func TestSlogDoesNotLeak(t *testing.T) {
	handlers := []struct {
		name string
		new  func(*bytes.Buffer) slog.Handler
	}{
		{"text", func(b *bytes.Buffer) slog.Handler { return slog.NewTextHandler(b, nil) }},
		{"json", func(b *bytes.Buffer) slog.Handler { return slog.NewJSONHandler(b, nil) }},
	}
	for _, key := range testKeys {
		k := secret.New(key)
		logs := []struct {
			name       string
			log        func(*slog.Logger)
			wantMarker bool // the redaction marker must appear
		}{
			{"Any value", func(l *slog.Logger) { l.Info("m", slog.Any("key", k)) }, true},
			{"Any pointer", func(l *slog.Logger) { l.Info("m", slog.Any("key", &k)) }, true},
			{"key-value args", func(l *slog.Logger) { l.Info("m", "key", k) }, true},
			{"With", func(l *slog.Logger) { l.With("key", k).Info("m") }, true},
			{"Group", func(l *slog.Logger) { l.Info("m", slog.Group("g", slog.Any("key", k))) }, true},
			{"exported struct field", func(l *slog.Logger) {
				l.Info("m", slog.Any("s", exported{Name: "e", Key: k}))
			}, false},
			{"unexported struct field", func(l *slog.Logger) {
				l.Info("m", slog.Any("s", unexported{name: "u", key: k}))
			}, false},
			{"nested", func(l *slog.Logger) {
				u := unexported{name: "u", key: k}
				l.Info("m", slog.Any("s", nested{Inner: &u, inner: u, List: []secret.Bytes{k}, anyv: k}))
			}, false},
			{"slice", func(l *slog.Logger) { l.Info("m", slog.Any("s", []secret.Bytes{k})) }, false},
			{"map", func(l *slog.Logger) { l.Info("m", slog.Any("s", map[string]secret.Bytes{"k": k})) }, false},
		}
		for _, h := range handlers {
			for _, lg := range logs {
				t.Run(fmt.Sprintf("%s/%s/%x", h.name, lg.name, key[:2]), func(t *testing.T) {
					var buf bytes.Buffer
					lg.log(slog.New(h.new(&buf)))
					out := buf.String()
					if out == "" {
						t.Fatalf("%s handler wrote nothing", h.name)
					}
					checkNoLeak(t, "log output", out, key)
					if lg.wantMarker && !strings.Contains(out, secret.Redacted) {
						t.Errorf("log output = %q, want it to contain %q", out, secret.Redacted)
					}
				})
			}
		}
	}
}

func TestSerializationRefused(t *testing.T) {
	k := secret.New(keyASCII)
	cases := []struct {
		name    string
		marshal func() ([]byte, error)
		wantErr bool
	}{
		{"json value", func() ([]byte, error) { return json.Marshal(k) }, true},
		{"json pointer", func() ([]byte, error) { return json.Marshal(&k) }, true},
		{"json exported field", func() ([]byte, error) { return json.Marshal(exported{Name: "e", Key: k}) }, true},
		{"json slice", func() ([]byte, error) { return json.Marshal([]secret.Bytes{k}) }, true},
		{"json map", func() ([]byte, error) { return json.Marshal(map[string]secret.Bytes{"k": k}) }, true},
		{"json unexported field", func() ([]byte, error) { return json.Marshal(unexported{name: "u", key: k}) }, false},
		{"xml exported field", func() ([]byte, error) { return xml.Marshal(exported{Name: "e", Key: k}) }, true},
		{"gob exported field", func() ([]byte, error) {
			var buf bytes.Buffer
			err := gob.NewEncoder(&buf).Encode(exported{Name: "e", Key: k})
			return buf.Bytes(), err
		}, true},
		{"MarshalText", k.MarshalText, true},
		{"MarshalBinary", k.MarshalBinary, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.marshal()
			if gotErr := err != nil; gotErr != tc.wantErr {
				t.Fatalf("%s error = %v, want error %t", tc.name, err, tc.wantErr)
			}
			if err != nil {
				checkNoLeak(t, tc.name+" error", err.Error(), keyASCII)
			}
			checkNoLeak(t, tc.name+" output", string(out), keyASCII)
		})
	}
	t.Run("sentinel", func(t *testing.T) {
		_, err := json.Marshal(k)
		if !errors.Is(err, secret.ErrSerialize) {
			t.Errorf("json.Marshal(k) error = %v, want %v", err, secret.ErrSerialize)
		}
	})
}

func TestCmpDiffDoesNotLeak(t *testing.T) {
	a := exported{Name: "e", Key: secret.New(keyASCII)}
	b := exported{Name: "e", Key: secret.New(keyA5)}
	diff := cmp.Diff(a, b)
	if diff == "" {
		t.Fatalf("cmp.Diff(a, b) = \"\", want a difference")
	}
	checkNoLeak(t, "cmp.Diff", diff, keyASCII)
	checkNoLeak(t, "cmp.Diff", diff, keyA5)
	if d := cmp.Diff(a, exported{Name: "e", Key: secret.New(keyASCII)}); d != "" {
		t.Errorf("cmp.Diff of equal keys = %q, want \"\"", d)
	}
}

func TestEqual(t *testing.T) {
	k := secret.New(keyASCII)
	wiped := secret.New(keyASCII)
	wiped.Wipe()
	wiped2 := secret.New(keyA5)
	wiped2.Wipe()
	cases := []struct {
		name string
		a, b secret.Bytes
		want bool
	}{
		{"equal", secret.New(keyASCII), secret.New(keyASCII), true},
		{"self", k, k, true},
		{"copy of the handle", k, func() secret.Bytes { c := k; return c }(), true},
		{"different same length", secret.New(keyASCII), secret.New(keyA5), false},
		{"differ in last byte", secret.New([]byte("abcd")), secret.New([]byte("abce")), false},
		{"different length", secret.New(keyASCII), secret.New(keyASCII[:31]), false},
		{"prefix", secret.New(keyASCII[:1]), secret.New(keyASCII), false},
		{"wiped vs key", wiped, secret.New(keyASCII), false},
		{"key vs wiped", secret.New(keyASCII), wiped, false},
		{"wiped vs wiped", wiped, wiped2, false},
		{"wiped vs self", wiped, wiped, false},
		{"zero vs zero", secret.Bytes{}, secret.Bytes{}, false},
		{"empty vs empty", secret.New(nil), secret.New([]byte{}), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.a.Equal(tc.b); got != tc.want {
				t.Errorf("Equal(%s) = %t, want %t", tc.name, got, tc.want)
			}
		})
	}
}

func TestWipe(t *testing.T) {
	k := secret.New(keyASCII)
	c := k // a copy of the handle, taken before the wipe
	ptr := &k
	if k.IsZero() || k.Len() != len(keyASCII) {
		t.Fatalf("before Wipe: IsZero() = %t, Len() = %d, want false, %d", k.IsZero(), k.Len(), len(keyASCII))
	}
	k.Wipe()
	k.Wipe() // safe to call twice
	for _, tc := range []struct {
		name string
		b    secret.Bytes
	}{{"original", k}, {"copy", c}, {"via pointer", *ptr}} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.b.Len(); got != 0 {
				t.Errorf("Len() after Wipe = %d, want 0", got)
			}
			if !tc.b.IsZero() {
				t.Errorf("IsZero() after Wipe = false, want true")
			}
			if got := tc.b.Data(); len(got) != 0 {
				t.Errorf("Data() after Wipe = %x, want empty", got)
			}
		})
	}
	t.Run("zero value", func(t *testing.T) {
		var z secret.Bytes
		z.Wipe()
		if !z.IsZero() || z.Len() != 0 || z.Data() != nil {
			t.Errorf("zero value after Wipe: IsZero() = %t, Len() = %d, Data() = %x, want true, 0, nil",
				z.IsZero(), z.Len(), z.Data())
		}
	})
}

func TestNewCopiesInput(t *testing.T) {
	// want is a fresh array that nothing else can reach, so only New could
	// have kept a copy.
	want := []byte("KEYMATERIAL-copied-by-New-000000")
	in := bytes.Clone(want)
	k := secret.New(in)
	clear(in)
	if got := k.Data(); !bytes.Equal(got, want) {
		t.Errorf("Data() after clearing New's input = %q, want %q", got, want)
	}
	out := k.Data()
	clear(out)
	if got := k.Data(); !bytes.Equal(got, want) {
		t.Errorf("Data() after clearing an earlier Data() = %q, want %q", got, want)
	}
	k.Wipe()
	if !bytes.Equal(in, make([]byte, len(in))) || !bytes.Equal(want, []byte("KEYMATERIAL-copied-by-New-000000")) {
		t.Errorf("Wipe reached memory it does not own: in = %q, want = %q", in, want)
	}
}

func TestNewEmpty(t *testing.T) {
	for _, in := range [][]byte{nil, {}} {
		t.Run(fmt.Sprintf("%#v", in), func(t *testing.T) {
			k := secret.New(in)
			if !k.IsZero() || k.Len() != 0 || k.Data() != nil {
				t.Errorf("New(%#v): IsZero() = %t, Len() = %d, Data() = %x, want true, 0, nil",
					in, k.IsZero(), k.Len(), k.Data())
			}
		})
	}
}

func TestRandom(t *testing.T) {
	for _, n := range []int{1, 16, 32, 64, 4096} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			a, err := secret.Random(n)
			if err != nil {
				t.Fatalf("Random(%d) error = %v, want nil", n, err)
			}
			defer a.Wipe()
			if got := a.Len(); got != n {
				t.Errorf("Random(%d).Len() = %d, want %d", n, got, n)
			}
			if got := len(a.Data()); got != n {
				t.Errorf("len(Random(%d).Data()) = %d, want %d", n, got, n)
			}
			if n < 16 {
				return // short outputs may collide by chance
			}
			b, err := secret.Random(n)
			if err != nil {
				t.Fatalf("Random(%d) error = %v, want nil", n, err)
			}
			defer b.Wipe()
			if a.Equal(b) {
				t.Errorf("two Random(%d) are Equal, want different", n)
			}
		})
	}
	for _, n := range []int{0, -1} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			k, err := secret.Random(n)
			if err == nil {
				t.Errorf("Random(%d) error = nil, want an error", n)
			}
			if !k.IsZero() {
				t.Errorf("Random(%d).IsZero() = false, want true", n)
			}
		})
	}
}

// TestConcurrentWipe races readers against Wipe; under -race it proves the
// handle is safe for concurrent use, and every reader sees either the whole
// key or nothing.
func TestConcurrentWipe(t *testing.T) {
	k := secret.New(keyASCII)
	ref := secret.New(keyASCII)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				if d := k.Data(); d != nil && !bytes.Equal(d, keyASCII) {
					t.Errorf("Data() = %q, want %q or nil", d, keyASCII)
				}
				_ = k.Equal(ref)
				_ = ref.Equal(k)
				_ = k.Len()
			}
		})
	}
	wg.Go(k.Wipe)
	wg.Wait()
	if !k.IsZero() {
		t.Errorf("IsZero() after concurrent Wipe = false, want true")
	}
}

// FuzzRedaction checks, for arbitrary key material, that every verb prints
// exactly the redaction marker and that the value round-trips through Data.
func FuzzRedaction(f *testing.F) {
	f.Add(keyA5)
	f.Add(keyASCII)
	f.Add([]byte{})
	f.Add([]byte("%v"))
	f.Fuzz(func(t *testing.T, data []byte) {
		k := secret.New(data)
		for _, verb := range verbs {
			if verb == "%T" || verb == "%p" {
				continue
			}
			if got := fmt.Sprintf(verb, k); got != secret.Redacted {
				t.Errorf("fmt.Sprintf(%q, New(%x)) = %q, want %q", verb, data, got, secret.Redacted)
			}
		}
		if got := k.Data(); !bytes.Equal(got, data) {
			t.Errorf("New(%x).Data() = %x, want %x", data, got, data)
		}
		if got, want := k.Equal(secret.New(data)), len(data) > 0; got != want {
			t.Errorf("New(%x).Equal(New(%x)) = %t, want %t", data, data, got, want)
		}
		k.Wipe()
		if !k.IsZero() {
			t.Errorf("New(%x) after Wipe: IsZero() = false, want true", data)
		}
	})
}
