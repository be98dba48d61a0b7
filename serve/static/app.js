"use strict";
// The sketch canvas: draw with the mouse (or a pen), and the drawing goes with the search form as the
// `sketch` file, the same field the JSON API takes. A grid that cannot be drawn says why instead of
// showing a broken image.
(function () {
  const canvas = document.getElementById("sketch-canvas");
  if (canvas) {
    const ctx = canvas.getContext("2d");
    const form = document.getElementById("search-form");
    const file = document.getElementById("sketch-file");
    const size = document.getElementById("pen-size");
    let colour = "#000000", down = false, drawn = false;
    const blank = () => { ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, canvas.width, canvas.height); drawn = false; };
    const at = (e) => {
      const r = canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
    };
    blank();
    canvas.addEventListener("pointerdown", (e) => {
      down = true; drawn = true;
      canvas.setPointerCapture(e.pointerId);
      ctx.strokeStyle = colour; ctx.lineWidth = Number(size.value); ctx.lineCap = "round"; ctx.lineJoin = "round";
      const [x, y] = at(e);
      ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x, y); ctx.stroke();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!down) return;
      const [x, y] = at(e);
      ctx.lineTo(x, y); ctx.stroke();
    });
    const lift = () => { down = false; };
    canvas.addEventListener("pointerup", lift);
    canvas.addEventListener("pointercancel", lift);
    for (const swatch of document.querySelectorAll(".swatch")) {
      swatch.addEventListener("click", () => {
        colour = swatch.dataset.colour;
        document.querySelectorAll(".swatch").forEach((s) => s.classList.toggle("active", s === swatch));
      });
    }
    document.getElementById("sketch-clear").addEventListener("click", blank);
    form.addEventListener("submit", (e) => {
      if (!drawn) return;
      e.preventDefault();
      canvas.toBlob((blob) => {
        const files = new DataTransfer();
        files.items.add(new File([blob], "sketch.png", { type: "image/png" }));
        file.files = files.files;
        form.submit();
      }, "image/png");
    });
  }
  const explain = (img) => {
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = "no image samples for this version";
    img.replaceWith(note);
  };
  for (const img of document.querySelectorAll("img[data-fallback]")) {
    if (img.complete && img.naturalWidth === 0) explain(img);  // failed before this script ran
    else img.addEventListener("error", () => explain(img));
  }
})();
