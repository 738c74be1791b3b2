package image

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// created is the fixed time of the test images.
var created = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

const testVersion = "v0.0.0-test.1"

// built is the images TestImages builds twice, from the repository this
// module lives in.
type built struct {
	first, second map[string]Result
}

func buildTwice(t *testing.T, binaries ...string) built {
	t.Helper()
	repo, err := RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	var b built
	for i, into := range []*map[string]Result{&b.first, &b.second} {
		o := Options{
			Repo: repo, Out: t.TempDir(), Binaries: binaries,
			Platforms: []v1.Platform{{OS: "linux", Architecture: runtime.GOARCH}},
			Version:   testVersion, Revision: "0123456789abcdef", Created: created,
		}
		results, err := BuildAll(context.Background(), o)
		if err != nil {
			t.Fatalf("build %d: %v", i+1, err)
		}
		*into = map[string]Result{}
		for _, r := range results {
			(*into)[r.Name] = r
		}
	}
	return b
}

// entry is one file of an image's filesystem, read back from its tarball.
type entry struct {
	hdr  *tar.Header
	data []byte
}

// readBack loads the tarball at r.Path with go-containerregistry, as
// `docker load` and crane would, and returns the image and its files.
func readBack(t *testing.T, r Result) (v1.Image, *v1.ConfigFile, map[string]entry) {
	t.Helper()
	tag, err := name.NewTag(r.Tag)
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(r.Path, &tag)
	if err != nil {
		t.Fatalf("tarball.ImageFromPath(%s, %s): %v", r.Path, tag, err)
	}
	if d, err := img.Digest(); err != nil || d != r.Digest {
		t.Fatalf("digest read back = %v, %v, want %v", d, err, r.Digest)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("layers = %d, want 1 (FROM scratch, one layer)", len(layers))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]entry{}
	var order []string
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		p := "/" + strings.TrimSuffix(hdr.Name, "/")
		if _, dup := files[p]; dup {
			t.Errorf("layer has %s twice", p)
		}
		files[p] = entry{hdr, data}
		order = append(order, p)
	}
	if !slices.IsSorted(order) {
		t.Errorf("layer entries are not sorted by path: %q", order)
	}
	return img, cf, files
}

func TestImages(t *testing.T) {
	b := buildTwice(t, "kms", "safe")

	t.Run("reproducible", func(t *testing.T) {
		for _, n := range []string{"kms", "safe"} {
			if b.first[n].Digest != b.second[n].Digest {
				t.Errorf("%s: two builds give digests %v and %v, want one", n, b.first[n].Digest, b.second[n].Digest)
			}
			one, err := os.ReadFile(b.first[n].Path)
			if err != nil {
				t.Fatal(err)
			}
			two, err := os.ReadFile(b.second[n].Path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(one, two) {
				t.Errorf("%s: the two tarballs differ (%d and %d bytes)", n, len(one), len(two))
			}
		}
	})

	for _, n := range []string{"kms", "safe"} {
		t.Run(n, func(t *testing.T) {
			r := b.first[n]
			if got, want := filepath.Base(r.Path), n+"-linux-"+runtime.GOARCH+".tar"; got != want {
				t.Errorf("tarball = %s, want %s", got, want)
			}
			if want := "cairn/" + n + ":" + testVersion; r.Tag != want {
				t.Errorf("tag = %s, want %s", r.Tag, want)
			}
			_, cf, files := readBack(t, r)
			checkConfig(t, n, cf)
			checkFilesystem(t, n, files)
			bin := files[Entrypoint(n)].data
			if n == "safe" {
				checkGlibcRuntime(t, bin, files)
			} else {
				checkStatic(t, bin)
			}
			runExtracted(t, n, files)
		})
	}
}

func checkConfig(t *testing.T, n string, cf *v1.ConfigFile) {
	t.Helper()
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform = %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if !cf.Created.Time.Equal(created) {
		t.Errorf("config created = %v, want %v", cf.Created.Time, created)
	}
	for _, h := range cf.History {
		if !h.Created.Time.Equal(created) {
			t.Errorf("history created = %v, want %v", h.Created.Time, created)
		}
	}
	want := v1.Config{
		Entrypoint: []string{"/usr/local/bin/" + n},
		User:       "65532:65532",
		WorkingDir: "/home/nonroot",
		Env:        []string{"PATH=/usr/local/bin", "HOME=/home/nonroot", "TMPDIR=/tmp"},
		Labels: map[string]string{
			"org.opencontainers.image.source":      "https://github.com/cairnkms/cairn",
			"org.opencontainers.image.url":         "https://github.com/cairnkms/cairn",
			"org.opencontainers.image.title":       "cairn " + n,
			"org.opencontainers.image.version":     testVersion,
			"org.opencontainers.image.revision":    "0123456789abcdef",
			"org.opencontainers.image.created":     "2024-05-06T07:08:09Z",
			"org.opencontainers.image.description": descriptions[n],
		},
	}
	if diff := cmp.Diff(want, cf.Config); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
	if len(cf.Config.Cmd) != 0 || len(cf.Config.Shell) != 0 {
		t.Errorf("Cmd = %q, Shell = %q, want none (no shell in the image)", cf.Config.Cmd, cf.Config.Shell)
	}
}

func checkFilesystem(t *testing.T, n string, files map[string]entry) {
	t.Helper()
	for _, sh := range []string{"/bin/sh", "/bin/bash", "/bin/busybox", "/usr/bin/sh", "/bin"} {
		if _, ok := files[sh]; ok {
			t.Errorf("the image has %s, want no shell", sh)
		}
	}
	for p, e := range files {
		if !e.hdr.ModTime.Equal(created) {
			t.Errorf("%s: mtime = %v, want %v", p, e.hdr.ModTime, created)
		}
		if e.hdr.Uname != "" || e.hdr.Gname != "" {
			t.Errorf("%s: owner names %q/%q, want none (numeric ids only)", p, e.hdr.Uname, e.hdr.Gname)
		}
		if e.hdr.Typeflag != tar.TypeReg && e.hdr.Typeflag != tar.TypeDir {
			t.Errorf("%s: type %q, want regular files and directories only", p, e.hdr.Typeflag)
		}
	}

	bin, ok := files["/usr/local/bin/"+n]
	switch {
	case !ok:
		t.Fatalf("no /usr/local/bin/%s in the image", n)
	case bin.hdr.Typeflag != tar.TypeReg || bin.hdr.Mode&0o111 != 0o111 || bin.hdr.Mode&0o022 != 0:
		t.Errorf("/usr/local/bin/%s: type %q mode %o, want a regular file, executable by all, writable by its owner only", n, bin.hdr.Typeflag, bin.hdr.Mode)
	case bin.hdr.Uid != 0 || bin.hdr.Gid != 0:
		t.Errorf("/usr/local/bin/%s owned by %d:%d, want 0:0 (the user cannot replace it)", n, bin.hdr.Uid, bin.hdr.Gid)
	}

	// The user the config names is a non-root numeric user of /etc/passwd
	// and /etc/group, whose home is the working directory.
	uid, gid, ok := strings.Cut(User, ":")
	if !ok || uid == "0" || gid == "0" {
		t.Errorf("User = %q, want a non-root uid:gid", User)
	}
	var pw []string
	for line := range strings.Lines(string(files["/etc/passwd"].data)) {
		if f := strings.Split(strings.TrimSpace(line), ":"); len(f) == 7 && f[2] == uid {
			pw = f
		}
	}
	if want := []string{"nonroot", "x", uid, gid, "nonroot", "/home/nonroot", "/sbin/nologin"}; !slices.Equal(pw, want) {
		t.Errorf("/etc/passwd entry of uid %s = %q, want %q", uid, pw, want)
	}
	if g := string(files["/etc/group"].data); !strings.Contains(g, "nonroot:x:"+gid+":") {
		t.Errorf("/etc/group = %q, want a nonroot group %s", g, gid)
	}
	home := files["/home/nonroot"].hdr
	if home == nil || home.Typeflag != tar.TypeDir || home.Uid != UID || home.Gid != GID || home.Mode&0o777 != 0o700 {
		t.Errorf("/home/nonroot = %+v, want a 0700 directory of %d:%d", home, UID, GID)
	}
	tmp := files["/tmp"].hdr
	if tmp == nil || tmp.Typeflag != tar.TypeDir || tmp.Mode&0o1777 != 0o1777 {
		t.Errorf("/tmp = %+v, want a sticky world-writable directory (mode 1777)", tmp)
	}
	for p := range files {
		if d := path.Dir(p); d != "/" {
			if e, ok := files[d]; !ok || e.hdr.Typeflag != tar.TypeDir {
				t.Errorf("%s: parent %s is not a directory entry of the layer", p, d)
			}
		}
	}
}

// checkStatic reads the ELF file directly (not through ReadLinkage): no
// program interpreter, no dynamic section, no needed library.
func checkStatic(t *testing.T, bin []byte) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		t.Fatalf("the binary is not ELF: %v", err)
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC {
		t.Errorf("ELF type = %v, want ET_EXEC (static, not PIE)", f.Type)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("the binary has a %v program header, want a static executable", p.Type)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) != 0 {
		t.Errorf("DT_NEEDED = %q, want none", libs)
	}
}

// checkGlibcRuntime checks the cgo safe: dynamically linked, and its
// interpreter and every library it needs, to the end, are in the image
// where the loader looks.
func checkGlibcRuntime(t *testing.T, bin []byte, files map[string]entry) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		t.Fatalf("the binary is not ELF: %v", err)
	}
	defer f.Close()
	var interp string
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b, err := io.ReadAll(p.Open())
			if err != nil {
				t.Fatal(err)
			}
			interp = string(bytes.TrimRight(b, "\x00"))
		}
	}
	if interp == "" {
		t.Fatal("the cgo safe has no PT_INTERP, want a glibc-linked executable")
	}
	if e, ok := files[interp]; !ok || e.hdr.Typeflag != tar.TypeReg || e.hdr.Mode&0o111 == 0 {
		t.Errorf("interpreter %s is not an executable file of the image", interp)
	}
	needed, err := f.ImportedLibraries()
	if err != nil || !slices.Contains(needed, "libc.so.6") {
		t.Errorf("DT_NEEDED = %q, %v, want libc.so.6 among them", needed, err)
	}
	seen := map[string]bool{path.Base(interp): true}
	for len(needed) > 0 {
		lib := needed[0]
		needed = needed[1:]
		if seen[lib] {
			continue
		}
		seen[lib] = true
		var found []byte
		for _, dir := range libDirs(runtime.GOARCH) {
			if e, ok := files[path.Join(dir, lib)]; ok {
				found = e.data
				break
			}
		}
		if found == nil {
			t.Errorf("%s is needed but not in the image's %q", lib, libDirs(runtime.GOARCH))
			continue
		}
		lf, err := elf.NewFile(bytes.NewReader(found))
		if err != nil {
			t.Fatalf("%s: %v", lib, err)
		}
		more, _ := lf.ImportedLibraries()
		lf.Close()
		needed = append(needed, more...)
	}
}

// runExtracted writes the image's filesystem to a directory and runs the
// binary from it with -h: it starts. The cgo safe is started by the image's
// own dynamic loader, with the image's library directory first and the
// loader's cache ignored.
func runExtracted(t *testing.T, n string, files map[string]entry) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Fatalf("the images are built for linux/%s; the test runs on %s, which cannot run them", runtime.GOARCH, runtime.GOOS)
	}
	root := t.TempDir()
	for p, e := range files {
		dst := filepath.Join(root, filepath.FromSlash(p))
		if e.hdr.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(dst, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, e.data, fs.FileMode(e.hdr.Mode)&fs.ModePerm); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(root, "usr", "local", "bin", n)
	cmd := exec.Command(bin, "-h")
	if n == "safe" {
		var interp, libdir string
		for p := range files {
			switch {
			case strings.HasPrefix(path.Base(p), "ld-linux"):
				interp = filepath.Join(root, p)
			case path.Base(p) == "libc.so.6":
				libdir = filepath.Join(root, path.Dir(p))
			}
		}
		cmd = exec.Command(interp, "--inhibit-cache", "--library-path", libdir, bin, "help")
	}
	out, err := cmd.CombinedOutput()
	if !strings.Contains(string(out), "Usage: "+n) {
		t.Errorf("%s: %v\n%s\nwant its usage", cmd, err, out)
	}
}

func TestLayer(t *testing.T) {
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 600, time.UTC)
	raw, err := Layer([]File{
		{Path: "/usr/local/bin/x", Mode: 0o755, Data: []byte("x")},
		{Path: "/a-b", Mode: 0o644, Data: []byte("ab")},
		{Path: "/a/b", Mode: 0o600, UID: 7, GID: 8, Data: []byte("b")},
		{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
	}, mtime)
	if err != nil {
		t.Fatal(err)
	}
	type got struct {
		Name     string
		Mode     int64
		UID, GID int
		Data     string
	}
	var entries []got
	tr := tar.NewReader(bytes.NewReader(raw))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(mtime.Truncate(time.Second)) {
			t.Errorf("%s: mtime %v, want %v", h.Name, h.ModTime, mtime.Truncate(time.Second))
		}
		d, _ := io.ReadAll(tr)
		entries = append(entries, got{h.Name, h.Mode, h.Uid, h.Gid, string(d)})
	}
	want := []got{
		{"a/", 0o755, 0, 0, ""}, // "/a" sorts before "/a-b": a parent before anything
		{"a-b", 0o644, 0, 0, "ab"},
		{"a/b", 0o600, 7, 8, "b"},
		{"tmp/", 0o1777, 0, 0, ""},
		{"usr/", 0o755, 0, 0, ""},
		{"usr/local/", 0o755, 0, 0, ""},
		{"usr/local/bin/", 0o755, 0, 0, ""},
		{"usr/local/bin/x", 0o755, 0, 0, "x"},
	}
	if diff := cmp.Diff(want, entries); diff != "" {
		t.Errorf("Layer entries (-want +got):\n%s", diff)
	}

	again, err := Layer([]File{
		{Path: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
		{Path: "/a/b", Mode: 0o600, UID: 7, GID: 8, Data: []byte("b")},
		{Path: "/a-b", Mode: 0o644, Data: []byte("ab")},
		{Path: "/usr/local/bin/x", Mode: 0o755, Data: []byte("x")},
	}, mtime)
	if err != nil || !bytes.Equal(raw, again) {
		t.Errorf("Layer of the same files in another order: equal = %v, err = %v; want the same bytes", bytes.Equal(raw, again), err)
	}
}

func TestLayerRefuses(t *testing.T) {
	tests := []struct {
		name  string
		files []File
	}{
		{"duplicate", []File{{Path: "/a", Mode: 0o644}, {Path: "/a", Mode: 0o644}}},
		{"file as a parent", []File{{Path: "/a", Mode: 0o644}, {Path: "/a/b", Mode: 0o644}}},
		{"symlink", []File{{Path: "/a", Mode: fs.ModeSymlink | 0o777}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if b, err := Layer(tt.files, created); err == nil {
				t.Errorf("Layer(%v) = %d bytes, nil; want an error", tt.files, len(b))
			}
		})
	}
}

func TestSpecValidate(t *testing.T) {
	ok := Spec{Name: "kms", Binary: []byte{1}, Platform: v1.Platform{OS: "linux", Architecture: "amd64"}, Version: "v1"}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v, want nil", ok, err)
	}
	tests := []struct {
		name   string
		change func(*Spec)
	}{
		{"empty name", func(s *Spec) { s.Name = "" }},
		{"name with a slash", func(s *Spec) { s.Name = "../kms" }},
		{"empty binary", func(s *Spec) { s.Binary = nil }},
		{"windows", func(s *Spec) { s.Platform.OS = "windows" }},
		{"no version", func(s *Spec) { s.Version = "" }},
		{"relative extra", func(s *Spec) { s.Extra = []File{{Path: "lib/x.so"}} }},
		{"unclean extra", func(s *Spec) { s.Extra = []File{{Path: "/lib/../x.so"}} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ok
			tt.change(&s)
			if err := s.Validate(); err == nil {
				t.Errorf("Validate(%+v) = nil, want an error", s)
			}
			if img, err := Build(s); err == nil {
				t.Errorf("Build(%+v) = %v, nil; want an error", s, img)
			}
		})
	}
}

func TestParsePlatform(t *testing.T) {
	tests := []struct {
		in      string
		want    v1.Platform
		wantErr bool
	}{
		{"linux/amd64", v1.Platform{OS: "linux", Architecture: "amd64"}, false},
		{"linux/arm64/v8", v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, false},
		{"darwin/arm64", v1.Platform{}, true},
		{"linux", v1.Platform{}, true},
		{"linux/", v1.Platform{}, true},
		{"linux/arm/v7/x", v1.Platform{}, true},
	}
	for _, tt := range tests {
		got, err := ParsePlatform(tt.in)
		if (err != nil) != tt.wantErr || got.String() != tt.want.String() {
			t.Errorf("ParsePlatform(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestOptionsRefused(t *testing.T) {
	other := "arm64"
	if runtime.GOARCH == "arm64" {
		other = "amd64"
	}
	tests := []struct {
		name   string
		change func(*Options)
	}{
		{"unknown binary", func(o *Options) { o.Binaries = []string{"kms", "sh"} }},
		{"bad version", func(o *Options) { o.Version = "not a tag!" }},
		{"no version", func(o *Options) { o.Version = "" }},
		{"no output directory", func(o *Options) { o.Out = "" }},
		{"safe for another arch", func(o *Options) {
			o.Binaries = []string{"safe"}
			o.Platforms = []v1.Platform{{OS: "linux", Architecture: other}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := t.TempDir()
			o := Options{Repo: "/nonexistent", Out: out, Version: "v1", Binaries: []string{"kms"}}
			tt.change(&o)
			if _, err := BuildAll(context.Background(), o); err == nil {
				t.Errorf("BuildAll(%+v) = nil error, want a refusal", o)
			}
			if ents, _ := os.ReadDir(out); len(ents) != 0 {
				t.Errorf("a refused BuildAll wrote %d files", len(ents))
			}
		})
	}
}
