package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Binaries are Cairn's commands (./cmd/<name>), one image each.
var Binaries = []string{"distributor", "rootkms", "kms", "regionctl", "safe", "cairn"}

// cgoBinaries need cgo. safe links safe/pkcs11safe, whose
// github.com/miekg/pkcs11 is cgo only (it dlopens the PKCS#11 module) and
// has no build tag that leaves PKCS#11 out, so safe is built with cgo and
// its image carries the glibc files it needs (see SharedLibraries). Every
// other binary is built with CGO_ENABLED=0 and is static.
var cgoBinaries = map[string]bool{"safe": true}

var descriptions = map[string]string{
	"distributor": "Cairn distributor: holds the root master key in RAM after a quorum unseal",
	"rootkms":     "Cairn root KMS: Raft-replicated region keys wrapped by the root key",
	"kms":         "Cairn regional KMS: customers' keysets in RAM, wraps and unwraps data keys",
	"regionctl":   "Cairn regionctl: bundles, staged rollouts and key rotation for SREs",
	"safe":        "Cairn safe: the security officers' tool (genesis, unseal ceremonies, rekey, drills)",
	"cairn":       "Cairn CLI: dev chain (cairn up), kms client, audit verification",
}

// Options configures BuildAll.
type Options struct {
	// Repo is the root of the Cairn repository (its go.mod names
	// github.com/cairnkms/cairn).
	Repo string
	// Out is the directory the tarballs are written to (created if missing).
	Out string
	// Binaries to build; empty means all of Binaries.
	Binaries []string
	// Platforms to build for; empty means linux/amd64.
	Platforms []v1.Platform
	// Prefix is the repository part of each tag: <Prefix>/<name>:<Version>.
	// Empty means "cairn".
	Prefix string
	// Version is the tag and the version label (required).
	Version string
	// Revision, if set, is the revision label (the git commit).
	Revision string
	// Created is every time in the images.
	Created time.Time
	// Go is the go command; empty means "go" from PATH.
	Go string
	// LibRoot is where a cgo binary's shared libraries are taken from;
	// empty means "/".
	LibRoot string
}

// Result describes one written image.
type Result struct {
	Name     string
	Platform v1.Platform
	Tag      string
	Path     string
	Digest   v1.Hash
	// BinarySize is the executable's size, LayerSize the compressed layer's,
	// FileSize the tarball's.
	BinarySize, LayerSize, FileSize int64
	Linkage                         Linkage
}

// FileName is the tarball name of the named binary's image for p.
func FileName(binary string, p v1.Platform) string {
	s := binary + "-" + p.OS + "-" + p.Architecture
	if p.Variant != "" {
		s += "-" + p.Variant
	}
	return s + ".tar"
}

func (o *Options) setDefaults() error {
	if len(o.Binaries) == 0 {
		o.Binaries = Binaries
	}
	if len(o.Platforms) == 0 {
		o.Platforms = []v1.Platform{{OS: "linux", Architecture: "amd64"}}
	}
	if o.Prefix == "" {
		o.Prefix = "cairn"
	}
	if o.Go == "" {
		o.Go = "go"
	}
	if o.LibRoot == "" {
		o.LibRoot = "/"
	}
	if o.Repo == "" || o.Out == "" {
		return errors.New("image: the repository and the output directory are required")
	}
	for _, b := range o.Binaries {
		if !slices.Contains(Binaries, b) {
			return fmt.Errorf("image: unknown binary %q (known: %s)", b, strings.Join(Binaries, ", "))
		}
	}
	for _, p := range o.Platforms {
		if p.OS != "linux" {
			return fmt.Errorf("%w: %s/%s", ErrNotLinux, p.OS, p.Architecture)
		}
		if slices.ContainsFunc(o.Binaries, func(b string) bool { return cgoBinaries[b] }) &&
			(runtime.GOOS != "linux" || runtime.GOARCH != p.Architecture) {
			return fmt.Errorf("image: safe needs cgo (PKCS#11) and this machine's C compiler and glibc are %s/%s, not linux/%s: build the safe image on a linux/%s machine, or leave it out (-binaries without safe)",
				runtime.GOOS, runtime.GOARCH, p.Architecture, p.Architecture)
		}
	}
	if _, err := name.NewTag(o.Prefix + "/x:" + o.Version); err != nil || o.Version == "" {
		return fmt.Errorf("image: version %q or prefix %q does not make a valid tag: %v", o.Version, o.Prefix, err)
	}
	return nil
}

// BuildAll builds the binaries for every platform and writes one image
// tarball per binary and platform into o.Out.
func BuildAll(ctx context.Context, o Options) ([]Result, error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	tmp, err := os.MkdirTemp("", "cairn-image-bin-")
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(tmp)

	var results []Result
	for _, p := range o.Platforms {
		dir := filepath.Join(tmp, p.OS+"-"+p.Architecture+p.Variant)
		if err := o.goBuild(ctx, p, dir); err != nil {
			return nil, err
		}
		for _, b := range o.Binaries {
			r, err := o.writeImage(b, p, filepath.Join(dir, b))
			if err != nil {
				return nil, err
			}
			results = append(results, r)
		}
	}
	return results, nil
}

// goBuild builds o.Binaries for p into dir: the static ones in one go build,
// the cgo ones in another.
func (o *Options) goBuild(ctx context.Context, p v1.Platform, dir string) error {
	var static, cgo []string
	for _, b := range o.Binaries {
		if cgoBinaries[b] {
			cgo = append(cgo, "./cmd/"+b)
		} else {
			static = append(static, "./cmd/"+b)
		}
	}
	env := []string{"GOOS=" + p.OS, "GOARCH=" + p.Architecture}
	if p.Architecture == "arm64" && p.Variant != "" {
		env = append(env, "GOARM64="+p.Variant+".0")
	}
	if p.Architecture == "arm" && p.Variant != "" {
		env = append(env, "GOARM="+strings.TrimPrefix(p.Variant, "v"))
	}
	// -trimpath and -ldflags=-s -w: no build paths, no symbol table or DWARF
	// (stack traces and pprof keep working: they use the pclntab).
	args := []string{"build", "-trimpath", "-ldflags=-s -w", "-o", dir + string(filepath.Separator)}
	if len(static) > 0 {
		if err := o.run(ctx, append(env, "CGO_ENABLED=0"), append(args, static...)); err != nil {
			return err
		}
	}
	if len(cgo) > 0 {
		// netgo, osusergo: name resolution and os/user in Go, so the image
		// needs no NSS modules or /etc/nsswitch.conf.
		cgoArgs := append(slices.Clone(args), "-tags=netgo,osusergo")
		if err := o.run(ctx, append(env, "CGO_ENABLED=1"), append(cgoArgs, cgo...)); err != nil {
			return err
		}
	}
	return nil
}

func (o *Options) run(ctx context.Context, env, args []string) error {
	cmd := exec.CommandContext(ctx, o.Go, args...)
	cmd.Dir = o.Repo
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("image: %s %s %s (in %s): %w\n%s", strings.Join(env, " "), o.Go, strings.Join(args, " "), o.Repo, err, out.Bytes())
	}
	return nil
}

func (o *Options) writeImage(binary string, p v1.Platform, binPath string) (Result, error) {
	bin, err := os.ReadFile(binPath)
	if err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	link, err := ReadLinkage(bin)
	if err != nil {
		return Result{}, fmt.Errorf("image: %s: %w", binary, err)
	}
	var extra []File
	if cgoBinaries[binary] {
		if extra, err = SharedLibraries(o.LibRoot, bin, p.Architecture); err != nil {
			return Result{}, fmt.Errorf("image: %s: %w", binary, err)
		}
	} else if !link.Static() {
		return Result{}, fmt.Errorf("image: %s was built with CGO_ENABLED=0 but is %s", binary, link)
	}
	img, err := Build(Spec{
		Name: binary, Binary: bin, Extra: extra, Platform: p,
		Version: o.Version, Revision: o.Revision, Created: o.Created,
		Description: descriptions[binary],
	})
	if err != nil {
		return Result{}, err
	}
	tag, err := name.NewTag(o.Prefix + "/" + binary + ":" + o.Version)
	if err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	r := Result{Name: binary, Platform: p, Tag: tag.String(), Path: filepath.Join(o.Out, FileName(binary, p)),
		BinarySize: int64(len(bin)), Linkage: link}
	if r.Digest, err = img.Digest(); err != nil {
		return Result{}, fmt.Errorf("image: %s: %w", binary, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return Result{}, fmt.Errorf("image: %s: %w", binary, err)
	}
	for _, l := range layers {
		n, err := l.Size()
		if err != nil {
			return Result{}, fmt.Errorf("image: %s: %w", binary, err)
		}
		r.LayerSize += n
	}
	// Written beside and renamed: a failed build leaves no half tarball.
	part := r.Path + ".part"
	if err := tarball.WriteToFile(part, tag, img); err != nil {
		os.Remove(part)
		return Result{}, fmt.Errorf("image: writing %s: %w", r.Path, err)
	}
	if err := os.Rename(part, r.Path); err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	fi, err := os.Stat(r.Path)
	if err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	r.FileSize = fi.Size()
	return r, nil
}

// RepoRoot finds the Cairn repository at or above dir: the directory whose
// go.mod declares module github.com/cairnkms/cairn.
func RepoRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("image: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && modulePath(b) == "github.com/cairnkms/cairn" {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("image: no go.mod of module github.com/cairnkms/cairn at or above the working directory; pass -repo")
		}
		dir = parent
	}
}

func modulePath(gomod []byte) string {
	for line := range strings.Lines(string(gomod)) {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`)
		}
	}
	return ""
}

// Git is what the repository's git says about the checkout; fields git
// cannot tell (no git, not a checkout) are left empty or zero.
type Git struct {
	// Version is `git describe --tags --always --dirty`.
	Version string
	// Revision is the commit (`git rev-parse HEAD`).
	Revision string
	// CommitTime is the commit's committer time.
	CommitTime time.Time
}

// ReadGit asks git about the checkout at repo.
func ReadGit(ctx context.Context, repo string) Git {
	out := func(args ...string) string {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = repo
		b, err := cmd.Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	g := Git{Version: out("describe", "--tags", "--always", "--dirty"), Revision: out("rev-parse", "HEAD")}
	if s, err := strconv.ParseInt(out("log", "-1", "--format=%ct"), 10, 64); err == nil {
		g.CommitTime = time.Unix(s, 0).UTC()
	}
	return g
}
