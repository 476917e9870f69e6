// The checks of the ops that take scores [B, C, h, w] and an image they follow (JBU's guide, PAMR's
// image): host only, included by common/jbu_prepare.h and common/pamr_checks.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace ovss_fast {

// Two 4D floating inputs on `device`, on one device, with one batch size: the scores [B, C, h, w] and the
// image they follow (the JBU guide, the PAMR image). `image_layout` names the second's expected layout.
inline void check_scores_and_image(const at::Tensor& scores, const at::Tensor& image, const char* image_name,
                                   const char* image_layout, c10::DeviceType device) {
  check_rank(scores, "scores", 4, "[B, C, h, w]");
  check_rank(image, image_name, 4, image_layout);
  check_floating(scores, "scores");
  check_floating(image, image_name);
  check_device(scores, "scores", device);
  check_device(image, image_name, device);
  check_same_device(scores, "scores", image, image_name);
  TORCH_CHECK(image.size(0) == scores.size(0), image_name, " has B = ", image.size(0), " (shape ", shape_str(image),
              ") but scores has B = ", scores.size(0));
}

}  // namespace ovss_fast
